"""The number training descends and the numbers evaluation reports are the ones we mean, checked directly rather
than through a learning curve (a random base learns past a 2-nat drop with broken isolation, a mis-normalised loss or
a leaked label alike):

- an optimizer step's loss and gradient are those of the mean NLL of every file's tokens, each file run alone and
  scored by transformers' own loss, however the batch is cut into micro-batches (isolation, normalisation by the
  whole batch's target count, padding and file starts never targets, the label shift); validation's sum and count
  of the same batch too;
- a target is predicted from the tokens before it in its own file and nothing else (no label leakage);
- the collator makes exactly the tokens each packing means targets, aligned with the inputs (never padding, and in
  isolated packing never a file's first token), and the loss counts exactly those;
- `held_out_loss` (the base-model and resume evals) is the `val/loss` Lightning logs, for the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from packed_files import EOS, PAD, SEQ_LEN, random_files, stream_pieces, tiny_lora_llama
from packed_files import one_thread  # noqa: F401 (an autouse fixture: importing it applies it here)

from codetune.data.datamodule import CodeDataModule
from codetune.data.loader import WindowCollator
from codetune.data.packing import pack_windows
from codetune.data.tokens import pad_token_id
from codetune.model.loss import IGNORE_INDEX
from codetune.model.module import CodeLoRAModule


class _OneProcess:
    """The strategy of a one-process run, as far as the step uses it."""

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision

    def backward(self, loss: torch.Tensor, optimizer, *args, **kwargs) -> None:
        loss.backward()


@pytest.fixture(scope="module")
def lora_model():
    return tiny_lora_llama()


def stepping_module(model, micro_batch_size: int, loss_chunk_size: int | None = 7) -> CodeLoRAModule:
    """A CodeLoRAModule around `model` as configure_model leaves it, attached to a one-process trainer (a loss
    chunk of 7 tokens spans rows; None takes the plain loss)."""
    module = CodeLoRAModule(micro_batch_size=micro_batch_size, loss_chunk_size=loss_chunk_size)
    module.model = model
    module._trainer = SimpleNamespace(world_size=1, strategy=_OneProcess())
    return module


def files() -> list[np.ndarray]:
    return random_files(1)


def pieces() -> list[tuple[int, int, np.ndarray]]:
    return stream_pieces(files())


def collated_batch(packing: str = "isolated") -> dict[str, torch.Tensor]:
    """All windows as one optimizer batch, built by the DataModule's own collator."""
    windows = pack_windows([f[:-1] for f in files()], SEQ_LEN, eos_id=EOS, pad_id=PAD, mode=packing)
    return WindowCollator(windows, packing)(list(range(len(windows))))


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean NLL over every piece's targets (all its tokens but the first), each piece run alone through the
    plain transformers model with transformers' own shifted loss, and its gradient."""
    model.zero_grad(set_to_none=True)
    total, count = torch.zeros(()), 0
    for _, _, tokens in pieces():
        ids = torch.from_numpy(tokens)[None]
        total = total + model(input_ids=ids, labels=ids).loss * (len(tokens) - 1)
        count += len(tokens) - 1
    loss = total / count
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(("micro_batch_size", "loss_chunk_size"), [(1, None), (2, 7), (5, 7), (5, None)])
def test_a_step_descends_the_mean_nll_of_the_files_alone_however_it_is_cut(lora_model, micro_batch_size,
                                                                           loss_chunk_size):
    batch = collated_batch()
    counts = [int((m[:, 1:] != IGNORE_INDEX).sum()) for m in batch["labels"].split(micro_batch_size)]
    assert micro_batch_size == 5 or len(set(counts)) > 1, "micro-batches of unequal target counts"
    expected_loss, expected_grads = reference_step(lora_model)
    module = stepping_module(lora_model, micro_batch_size, loss_chunk_size)
    lora_model.zero_grad(set_to_none=True)
    loss = module.backward_with_backoff(batch)
    grads = trainable_grads(lora_model)
    lora_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == 2 * 4 * 2  # A and B of q, k, v, o in 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Validation sums the same way, and its count (the weight of the batch in val/loss) is the true target count.
    with torch.no_grad():
        loss_sum, n = module.eval_loss_sum(batch)
    assert n.item() == sum(len(t) - 1 for _, _, t in pieces())
    torch.testing.assert_close(loss_sum / n, expected_loss, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_target_is_predicted_from_the_tokens_before_it_in_its_file_only(lora_model):
    """For one target at a time (the first and last of a file, one after a window's start, one before padding),
    the module's loss is the cross-entropy of the model run on that file's preceding tokens alone: the target and
    what follows it are not visible, and neither is the previous file."""
    batch = collated_batch()
    starts = {(row, column): tokens for row, column, tokens in pieces()}
    for row, column in [(1, 10), (1, 15), (2, 6), (2, 15), (4, 1), (4, 9)]:
        start = max(c for r, c in starts if r == row and c < column)
        prefix = torch.from_numpy(starts[row, start][:column - start])[None]
        logits = lora_model(input_ids=prefix, use_cache=False).logits[0, -1]
        target = batch["input_ids"][row, column]
        expected = torch.nn.functional.cross_entropy(logits[None], target[None])
        one = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
        one["labels"][row, column] = batch["labels"][row, column]
        for chunk in (7, None):
            loss, n = stepping_module(lora_model, 5, chunk).loss_sum(one)
            assert n.item() == 1, (row, column)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5, msg=f"row {row}, column {column}, {chunk}")


@pytest.mark.parametrize("packing", ["isolated", "concat"])
def test_the_collator_targets_exactly_the_tokens_each_packing_means(lora_model, packing):
    """Aligned with the inputs (the loss shifts; column 0 is never a target). Isolated: a piece's first token is no
    target (nothing of its file precedes it); concat: every real token is. Padding never is."""
    batch = collated_batch(packing)
    expected = torch.full_like(batch["labels"], IGNORE_INDEX)
    for row, column, tokens in pieces():
        first = column + 1 if packing == "isolated" else column
        expected[row, first:column + len(tokens)] = torch.from_numpy(tokens[first - column:])
    assert batch["labels"][:, 1:].tolist() == expected[:, 1:].tolist()
    n_expected = 15 + 14 + 13 + 15 + 8 if packing == "isolated" else 4 * 15 + 9
    for chunk in (7, None):
        assert stepping_module(lora_model, 2, chunk).loss_sum(batch)[1].item() == n_expected, chunk


class _RandomAdapter(Callback):
    """Once the model is built: random adapter B weights, so the compared evals depend on the adapter, and a base
    head 20 times sharper (the tiny base's is near-uniform), so that its effect on the loss is far above rounding."""

    def on_validation_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            pl_module.causal_lm.get_output_embeddings().weight.mul_(20.0)
            for name, p in pl_module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)


def validation_data(repo, seq_len: int) -> CodeDataModule:
    """A data module whose validation split is three batches of 4, 4 and 1 windows, the last holding 3 targets:
    a mean of batch means would weigh those 3 targets as much as each full batch."""
    data = CodeDataModule(repo=str(repo), seq_len=seq_len, batch_size=2, gradient_accumulation_steps=2, fim_rate=0.0,
                          tiny_vocab_size=300, cache_dir=None)
    data.setup("validate")  # the repository's files and a tiny tokenizer; fit/validate then keep them
    rng = np.random.default_rng(0)
    files = [rng.integers(0, len(data.tokenizer), n) for n in (120, 100, 37)]  # + 3 EOS: 8 windows and 4 tokens
    data.val_windows = pack_windows(files, seq_len, data.tokenizer.eos_token_id, pad_token_id(data.tokenizer))
    return data


def test_held_out_loss_is_the_logged_val_loss_for_the_same_weights(tmp_path):
    from helpers import write_fixture_repo

    torch.manual_seed(0)
    data = validation_data(write_fixture_repo(tmp_path / "repo"), seq_len=32)
    # Dropout on the adapters: an eval that forgot eval mode would differ.
    module = CodeLoRAModule(seq_len=32, micro_batch_size=2, lora_dropout=0.5, modules_to_save=[], quantization="none")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path / "run",
                        callbacks=[_RandomAdapter()])
    val_loss = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in data.val_dataloader()][2] == 3
    module.train()  # as the base eval finds it, at the start of training
    assert module.held_out_loss() == pytest.approx(val_loss, rel=1e-6)
    with module.model.disable_adapter():
        assert abs(module.held_out_loss() - val_loss) > 0.05, "the adapter is part of both evals"
