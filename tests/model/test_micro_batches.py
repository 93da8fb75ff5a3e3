"""The step's one owner of the micro-batch (`codetune.model.step.StepNumerics`): halving arithmetic, the checkpointed
micro-batch a resume starts from, and the OOM retry loop (attempt, vote, discard, halve) on a stand-in module whose
gradients can be compared number for number."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from codetune.errors import OutOfMemoryAtMinimumError
from codetune.memory.backoff import BackOff, InjectedOOM
from codetune.model.step import StepNumerics, count_targets, split_batch


def test_a_back_off_halves_for_good_and_stops_at_one():
    numerics = StepNumerics(8)
    assert numerics.accumulation_steps(16) == 2
    back_off = numerics.back_off(3, 16, "proactive")
    assert back_off == BackOff(step=3, previous_micro_batch_size=8, micro_batch_size=4, gradient_accumulation_steps=4,
                               optimizer_batch=16, reason="proactive")
    assert back_off.record() == {"step": 3, "micro_batch_size": 4, "gradient_accumulation_steps": 4,
                                 "reason": "proactive"}
    assert numerics.micro_batch_size == 4 and numerics.accumulation_steps(16) == 4
    numerics.back_off(4, 16, "oom")
    numerics.back_off(5, 16, "oom")
    assert numerics.micro_batch_size == 1
    assert numerics.back_off(6, 16, "oom") is None and numerics.micro_batch_size == 1
    # A batch that does not divide: the last micro-batch is smaller.
    assert BackOff.of(0, 6, 10, "oom").gradient_accumulation_steps == 4


def test_the_backed_off_micro_batch_round_trips_through_state_dict():
    trained = StepNumerics("auto")
    trained.planned(8)
    assert trained.state_dict() == {"backed_off_to": None}
    bigger = StepNumerics(16)
    bigger.load_state_dict(trained.state_dict())
    assert bigger.micro_batch_size == 16, "a run that never backed off resumes at the micro-batch it is given"
    trained.back_off(2, 16, "oom")
    assert trained.state_dict() == {"backed_off_to": 4}
    for given, resumed_at in ((16, 4), (4, 4), (2, 2)):
        resumed = StepNumerics(given)
        resumed.load_state_dict(trained.state_dict())
        assert resumed.micro_batch_size == resumed_at, given
        assert resumed.state_dict() == {"backed_off_to": 4}, "the cap goes on into the next checkpoint"
    # A checkpoint without the step's state (its key absent) changes nothing.
    untouched = StepNumerics(8)
    untouched.load_state_dict({})
    assert untouched.micro_batch_size == 8 and untouched.state_dict() == {"backed_off_to": None}


class _Strategy:
    """One rank's strategy: its vote, optionally overruled by another rank that ran out (`others_ran_out`)."""

    def __init__(self, others_ran_out: list[bool] | None = None) -> None:
        self.votes: list[bool] = []
        self.others_ran_out = others_ran_out or []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.votes.append(decision)
        other = self.others_ran_out[len(self.votes) - 1] if len(self.votes) <= len(self.others_ran_out) else False
        return decision and not other


class LinearStepper:
    """What the step uses of a LightningModule, around one linear layer: `loss_sum` sums the squared outputs of the
    targeted tokens, and raises an OOM while `oom_above` windows or more are in a micro-batch (once, or always)."""

    def __init__(self, strategy: _Strategy, oom_above: int | None = None, always: bool = False) -> None:
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)
        self.trainer = SimpleNamespace(world_size=1, global_step=5, global_rank=0, strategy=strategy)
        self.device = torch.device("cpu")
        self.hparams = SimpleNamespace(seq_len=6)
        self.oom_above, self.always, self.sizes = oom_above, always, []

    def loss_sum(self, micro):
        self.sizes.append(micro["input_ids"].shape[0])
        if self.oom_above is not None and micro["input_ids"].shape[0] >= self.oom_above:
            if not self.always:
                self.oom_above = None
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        targets = (micro["labels"][:, 1:] != -100).unsqueeze(-1)
        out = self.layer(micro["input_ids"][:, 1:].float().unsqueeze(-1).expand(-1, -1, 4))
        return (out.pow(2) * targets).sum(), count_targets(micro["labels"])

    def manual_backward(self, loss) -> None:
        loss.backward()

    def parameters(self):
        return self.layer.parameters()

    def optimizers(self):
        return SimpleNamespace(zero_grad=lambda set_to_none: self.layer.zero_grad(set_to_none=set_to_none))

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.clone() for p in self.layer.parameters()]


def optimizer_batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(8 * 6).reshape(8, 6) % 7
    labels = ids.clone()
    labels[::3, 3:] = -100  # micro-batches of unequal target counts
    return {"input_ids": ids, "labels": labels}


def test_an_oom_is_retried_at_half_the_micro_batch_with_the_same_gradient():
    batch, records = optimizer_batch(), []
    clean = LinearStepper(_Strategy())
    clean_loss = StepNumerics(4).backward(clean, batch)
    module = LinearStepper(_Strategy(), oom_above=4)
    numerics = StepNumerics(4)
    numerics.retry_out_of_memory(lambda trainer, back_off, ran_out: records.append((back_off, ran_out)))
    loss = numerics.backward(module, batch)
    assert module.sizes == [4, 2, 2, 2, 2] and module.trainer.strategy.votes == [False, True]
    assert records == [(BackOff(5, 4, 2, 4, 8, "oom"), True)] and numerics.micro_batch_size == 2
    torch.testing.assert_close(loss, clean_loss)
    for a, b in zip(module.grads(), clean.grads()):
        torch.testing.assert_close(a, b)


def test_a_rank_that_did_not_run_out_follows_the_vote_and_says_so():
    records = []
    module = LinearStepper(_Strategy(others_ran_out=[True]))
    numerics = StepNumerics(4)
    numerics.retry_out_of_memory(lambda trainer, back_off, ran_out: records.append((back_off.micro_batch_size, ran_out)))
    numerics.backward(module, optimizer_batch())
    assert records == [(2, False)] and module.sizes == [4, 4, 2, 2, 2, 2], "its partial gradients were redone"


def test_without_retry_an_oom_is_raised_and_at_one_window_the_run_stops():
    with pytest.raises(torch.OutOfMemoryError):
        StepNumerics(4).backward(LinearStepper(_Strategy(), oom_above=4), optimizer_batch())
    numerics = StepNumerics(2)
    numerics.retry_out_of_memory(lambda *args: None)
    with pytest.raises(OutOfMemoryAtMinimumError, match="at optimizer step 5 with a micro-batch of one window of 6 "):
        numerics.backward(LinearStepper(_Strategy(), oom_above=1, always=True), optimizer_batch())


def test_the_injected_oom_fires_once_on_the_second_micro_batch():
    records = []
    module = LinearStepper(_Strategy())
    numerics = StepNumerics(4)
    numerics.retry_out_of_memory(lambda trainer, back_off, ran_out: records.append(back_off.step),
                                 InjectedOOM(step=5))
    numerics.backward(module, optimizer_batch())
    # The first micro-batch ran (and its backward), the second raised before its forward; then 4 x 2.
    assert module.sizes == [4, 2, 2, 2, 2] and records == [5]
    module.sizes.clear()
    numerics.backward(module, optimizer_batch())
    assert module.sizes == [2, 2, 2, 2] and records == [5], "once only"


def test_validation_halves_its_own_micro_batch_and_keeps_it():
    module = LinearStepper(_Strategy(), oom_above=4)
    numerics = StepNumerics(4)
    with torch.no_grad():
        loss_sum, n = numerics.eval_loss_sum(module, optimizer_batch())
        again = numerics.eval_loss_sum(module, optimizer_batch())
    assert module.sizes == [4, 2, 2, 2, 2, 2, 2, 2, 2] and numerics.micro_batch_size == 4, "training's is untouched"
    assert n == count_targets(optimizer_batch()["labels"]) and torch.equal(again[0], loss_sum)
    assert [len(m["input_ids"]) for m in split_batch(optimizer_batch(), 3)] == [3, 3, 2]
