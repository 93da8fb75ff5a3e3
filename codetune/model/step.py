"""One optimizer step's numerics: the micro-batch, the OOM retry, the sums over ranks and the finite vote.

Each training batch is a whole optimizer batch (micro-batch x accumulation windows) that `StepNumerics` cuts into
micro-batches. The loss of every micro-batch is a *sum* of token cross-entropies divided by the target count of
the whole optimizer batch, so the gradient is the same however the batch is cut: an OOM back-off changes only the
micro-batch.

Under DDP every rank divides its summed loss by the target count of *all* ranks' windows of the step (one
all-reduce of an integer), and the gradients are summed once, after every rank finished its micro-batches: the
gradient is the global token mean's whatever each rank holds, an empty share of the last step included. DDP's own
sync inside each backward is off, so a rank that ran out of memory mid-batch never leaves the others waiting in a
collective.

Out of memory: after each attempt at the batch every rank votes through the strategy (`reduce_boolean_decision`);
when any rank ran out, all of them drop their partial gradients, free the memory and run the same windows again
at half the micro-batch (`codetune.memory.backoff`); at micro-batch 1 the run stops. Retrying is on once the OOM
callback asked for it (`StepNumerics.retry_out_of_memory`); otherwise an OOM is raised as it is.

Finite numbers: the precision plugin unscales the gradients (under a GradScaler) before the module's
`on_before_optimizer_step`, where every rank votes that its loss and gradient norm are finite (`grad_norm_vote`).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from codetune.errors import OutOfMemoryAtMinimumError
from codetune.memory.backoff import (INJECT_OOM_ENV, BackOff, InjectedOOM, accumulation_steps, halved,
                                     is_out_of_memory, oom_at_minimum_message)
from codetune.model.loss import IGNORE_INDEX
from codetune.model.messages import eval_oom_message, optimizer_oom_message

Batch = dict[str, torch.Tensor]
# Told of each back-off after an OOM: the trainer, the back-off, and whether this rank is one that ran out.
OOMRecord = Callable[[L.Trainer, BackOff, bool], None]


class StepNumerics:
    """The one owner of the micro-batch size, and of how an optimizer batch becomes the step's gradients.

    It cuts each optimizer batch into micro-batches, runs their forward/backward through the LightningModule it is
    handed (its `loss_sum`, `manual_backward` and trainer; nothing here keeps it), retries at half the micro-batch
    after an OOM on any rank (once `retry_out_of_memory` is on), and sums the gradients over ranks. Validation runs
    at the training micro-batch, or at halves of it after an OOM of its own.

    State: the micro-batch the last back-off left is in `state_dict` (the module checkpoints it), so a resumed run
    trains at no more than that; a run that never backed off resumes at the micro-batch it is given.

    Args:
        micro_batch_size: Windows per forward/backward, or 'auto' until the memory plan chooses (`planned`).
    """

    def __init__(self, micro_batch_size: int | Literal["auto"]) -> None:
        self._micro_batch_size = micro_batch_size
        self._backed_off_to: int | None = None
        # Validation's micro-batch after its own OOM back-off (None: the training micro-batch).
        self._eval_micro_batch_size: int | None = None
        self._record_oom: OOMRecord | None = None
        self._inject: InjectedOOM | None = None
        self._injected = False
        self._flat_grads: dict[torch.dtype, tuple[list[torch.nn.Parameter], torch.Tensor]] = {}

    @property
    def micro_batch_size(self) -> int | Literal["auto"]:
        """Windows per forward/backward ('auto' only until the memory plan chose)."""
        return self._micro_batch_size

    def planned(self, micro_batch_size: int) -> None:
        """Train at the micro-batch the memory plan chose (or kept) when the model was loaded."""
        self._micro_batch_size = micro_batch_size

    def accumulation_steps(self, optimizer_batch: int) -> int:
        """Micro-batches per optimizer batch of `optimizer_batch` windows."""
        return accumulation_steps(optimizer_batch, self._micro_batch_size)

    def retry_out_of_memory(self, record: OOMRecord, inject: InjectedOOM | None = None) -> None:
        """Redo a step that ran out of memory on any rank at half the micro-batch, telling `record` of each back-off;
        `inject` is the CODETUNE_INJECT_OOM testing aid. Until this is called an OOM is raised as it is."""
        self._record_oom, self._inject = record, inject

    def back_off(self, step: int, optimizer_batch: int, reason: Literal["oom", "proactive"]) -> BackOff | None:
        """Halve the micro-batch for good, at optimizer step `step`; None (and nothing changes) at micro-batch 1."""
        back_off = BackOff.of(step, self._micro_batch_size, optimizer_batch, reason)
        if back_off is not None:
            self._micro_batch_size = self._backed_off_to = back_off.micro_batch_size
        return back_off

    def cap(self, micro_batch_size: int) -> None:
        """Train at no more than `micro_batch_size` windows from now on: an earlier segment backed off to it."""
        self._micro_batch_size = min(self._micro_batch_size, micro_batch_size)
        self._backed_off_to = min(self._backed_off_to or micro_batch_size, micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"backed_off_to": self._backed_off_to}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backed_off_to") is not None:
            self.cap(state["backed_off_to"])

    # -- training ------------------------------------------------------------------------------

    def backward(self, module: L.LightningModule, batch: Batch) -> torch.Tensor:
        """Gradients of one optimizer batch, summed over ranks; after an OOM on any rank, every rank drops its
        partial gradients and runs the same batch again at half the micro-batch. Returns the mean token loss of the
        whole (all ranks') optimizer batch."""
        trainer = module.trainer
        # Every rank divides by the target count of all ranks together, and the gradients are then summed: the
        # gradient is the global token mean's, whatever each rank holds (an empty tail batch included).
        n_targets = sum_over_ranks(trainer, count_targets(batch["labels"])).clamp(min=1)
        while True:
            loss = self._attempt(module, batch, n_targets)
            # Every rank reaches this point whether or not it ran out of memory, so the vote cannot hang.
            if trainer.strategy.reduce_boolean_decision(loss is not None, all=True):
                return self._all_reduce_gradients(trainer, loss)
            discard_attempt(module)
            self._back_off_after_oom(trainer, batch["input_ids"].shape[0], module.hparams.seq_len, loss is None)

    def _attempt(self, module: L.LightningModule, batch: Batch, n_targets: torch.Tensor) -> torch.Tensor | None:
        try:
            loss = self.accumulate_gradients(module, batch, n_targets)
            if module.trainer.world_size > 1:
                # The all-reduce's buffer is allocated here, inside the attempt, so that running out of memory
                # for it is an OOM like any other (voted on, backed off) rather than a rank missing a collective.
                self._gradient_buffers(module)
            return loss
        except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate
            if self._record_oom is None or not is_out_of_memory(err):
                raise
            # Leaving the except block drops the traceback, and with it the failed attempt's activations.
            return None

    def accumulate_gradients(self, module: L.LightningModule, batch: Batch, n_targets: torch.Tensor) -> torch.Tensor:
        """Forward/backward every micro-batch of this rank's share of an optimizer batch, each micro-batch's summed
        loss divided by `n_targets` (the whole optimizer batch's, all ranks); returns this rank's share of the mean."""
        total = torch.zeros((), device=module.device)
        micro_batches = split_batch(batch, self._micro_batch_size)
        for i, micro in enumerate(micro_batches):
            # Testing aid (CODETUNE_INJECT_OOM): fails on the second micro-batch, after a backward.
            self._maybe_inject_oom(module.trainer, i == min(1, len(micro_batches) - 1))
            loss_sum, _ = module.loss_sum(micro)
            # Divide by the whole batch's target count: gradients do not depend on the split.
            module.manual_backward(loss_sum / n_targets)
            total += loss_sum.detach()
        return total / n_targets

    def _maybe_inject_oom(self, trainer: L.Trainer, at_this_micro_batch: bool) -> None:
        """Raise the injected OOM if `CODETUNE_INJECT_OOM` names this step (its first attempt only)."""
        if (self._inject is None or self._injected or not at_this_micro_batch
                or not self._inject.fires(trainer.global_step, trainer.global_rank, self._micro_batch_size)):
            return
        self._injected = True
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV} at step "
                                     f"{trainer.global_step} on rank {trainer.global_rank})")

    def _back_off_after_oom(self, trainer: L.Trainer, optimizer_batch: int, seq_len: int, ran_out: bool) -> None:
        back_off = self.back_off(trainer.global_step, optimizer_batch, "oom")
        if back_off is None:
            raise OutOfMemoryAtMinimumError(oom_at_minimum_message(trainer.global_step, seq_len))
        self._record_oom(trainer, back_off, ran_out)

    def _gradient_buffers(self, module: L.LightningModule) -> None:
        """The trainable parameters' gradients packed into one flat tensor per dtype (LoRA's fp32, and a bf16
        `modules_to_save` copy when there is one: a collective takes one dtype)."""
        groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in module.parameters():
            if p.requires_grad:
                groups.setdefault(p.dtype, []).append(p)
        self._flat_grads = {dtype: (params, torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                                        .reshape(-1) for p in params]))
                            for dtype, params in groups.items()}

    def _all_reduce_gradients(self, trainer: L.Trainer, loss: torch.Tensor) -> torch.Tensor:
        """Sum the trainable parameters' gradients over ranks, one collective per dtype (each rank's gradient is
        already divided by the global target count, so the sum is the global mean's gradient). Returns the
        global batch's mean token loss (this rank's share summed over ranks)."""
        if trainer.world_size == 1:
            return loss
        loss = sum_over_ranks(trainer, loss.detach().clone())
        for params, flat in self._flat_grads.values():
            torch.distributed.all_reduce(flat)
            for p, synced in zip(params, flat.split([p.numel() for p in params])):
                p.grad = synced.view_as(p)
        self._flat_grads = {}
        return loss

    # -- validation ----------------------------------------------------------------------------

    def eval_loss_sum(self, module: L.LightningModule, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token NLL, target count) of a validation batch, run at the training micro-batch (after an OOM
        back-off it fits too) and, should it still run out of memory, at halves of it down to one window."""
        micro_batch = min(self._eval_micro_batch_size or self._micro_batch_size, self._micro_batch_size)
        while True:
            try:
                sums = [module.loss_sum(micro) for micro in split_batch(batch, micro_batch)]
                self._eval_micro_batch_size = micro_batch
                return (torch.stack([s for s, _ in sums]).sum() if sums else torch.zeros((), device=module.device),
                        sum((n for _, n in sums), torch.zeros((), dtype=torch.int64, device=module.device)))
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
            smaller = halved(micro_batch)
            if smaller is None:
                raise OutOfMemoryAtMinimumError(eval_oom_message(module.hparams.seq_len))
            micro_batch = smaller
            discard_attempt(module)


class GradNormVote(NamedTuple):
    """The step's total gradient norm (a tensor to clip with, and its value), the loss's value, and whether every
    rank found its loss and norm finite."""

    norm: torch.Tensor
    value: float
    loss: float
    finite: bool


def grad_norm_vote(trainer: L.Trainer, loss: torch.Tensor, optimizer) -> GradNormVote:
    """The step's gradient norm, and the vote of every rank (finite or not, so none waits in a collective that
    another never reaches) that its loss and norm are finite. Under a float16 GradScaler an infinite gradient is
    the scaler's to skip, so only the loss counts there."""
    grads = [p.grad for p in stepped_parameters(optimizer) if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    # One device-to-host copy for both numbers.
    loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float().to(loss.device)]).tolist()
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or grad_scaler_enabled(trainer))
    return GradNormVote(grad_norm, norm_value, loss_value, trainer.strategy.reduce_boolean_decision(finite, all=True))


def step_optimizer(trainer: L.Trainer, optimizer, optimizer_name: str) -> None:
    """`optimizer.step()`. Running out of memory in it (AdamW allocates its state at the first step) stops the
    run on every rank with one message: no rank may go on with weights the others did not update."""
    try:
        optimizer.step()
        ran_out = None
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        ran_out = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not trainer.strategy.reduce_boolean_decision(ran_out is None, all=True):
        trainable = [(p.numel(), p.element_size()) for p in stepped_parameters(optimizer)]
        raise OutOfMemoryAtMinimumError(optimizer_oom_message(trainer.global_step, ran_out, optimizer_name, trainable))


def disable_ddp_backward_sync(trainer: L.Trainer) -> None:
    """Gradients are all-reduced once per optimizer step, after every rank finished its micro-batches: with DDP's
    sync inside each backward, a rank that ran out of memory mid-batch would leave the others waiting in a
    collective forever. Lightning turns the flag back on after every forward (manual optimization), so it is
    turned off inside each step."""
    ddp = trainer.strategy.model
    if isinstance(ddp, DistributedDataParallel):
        ddp.require_backward_grad_sync = False


def sum_over_ranks(trainer: L.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, in place (as it is with one process)."""
    # torch's collective rather than strategy.reduce, which adds a barrier before each reduction.
    if trainer.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def discard_attempt(module: L.LightningModule) -> None:
    """Drop a failed attempt's partial gradients and give its memory back to the card."""
    module.optimizers().zero_grad(set_to_none=True)
    gc.collect()
    if module.device.type == "cuda":
        torch.cuda.empty_cache()


def stepped_parameters(optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: what Lightning's clip_gradients would clip."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def grad_scaler_enabled(trainer: L.Trainer) -> bool:
    # Only the mixed-precision plugins have a scaler at all.
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def flash_attention(config) -> bool:
    """Whether the model runs a flash-attention kernel, which reads restarting position ids as packed files only
    when the batch has one row (transformers' `_is_packed_sequence`)."""
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def one_row(input_ids: torch.Tensor, position_ids: torch.Tensor,
            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch of B windows as one row of B x S tokens, for flash attention's varlen path: every window
    starts at position 0, so it is a packed sequence of its own and no token attends across windows or files.
    Each window's first label is masked: in B rows it was never a target (nothing precedes it), and in one row
    it must not become the target of the previous window's last token."""
    labels = labels.clone()
    labels[:, 0] = IGNORE_INDEX
    return input_ids.reshape(1, -1), position_ids.reshape(1, -1), labels.reshape(1, -1)


def split_batch(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Consecutive micro-batches of at most `micro_batch_size` rows."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    # The loss predicts labels[:, 1:]; the first column is never a target.
    return (labels[:, 1:] != IGNORE_INDEX).sum()
