"""Packed windows at micro-batch > 1 keep every file to itself, through the module's own path (`CodeLoRAModule`'s
decoder + LoRA forward and chunked loss, in training mode) for eager, sdpa and flash attention (emulated on the CPU
with transformers' own packed-sequence rule): each file's logits, and the batch's loss and LoRA gradients, are those
of the files run alone. The rows hold one, two and three files, a file continued from the previous window, and
padding."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.flash_attention as flash_integration
from packed_files import EOS, PAD, SEQ_LEN, random_files, stream_pieces, tiny_lora_llama
from packed_files import one_thread  # noqa: F401 (an autouse fixture: importing it applies it here)
from helpers import emulated_card
from transformers.modeling_flash_attention_utils import _is_packed_sequence

import codetune.model.attention as attention_lib
from codetune.data.packing import pack_windows, window_labels
from codetune.model.loss import causal_lm_loss_sum
from codetune.model.module import CodeLoRAModule
# codetune's own sdpa on the CPU, and on an emulated Turing card (memory-efficient kernel: k/v repeated, no GQA).
ATTENTIONS = ["eager", "sdpa", "flash_attention_2", "codetune_sdpa", "codetune_sdpa@7.5"]


def emulated_flash(query, key, value, attention_mask, query_length, is_causal, position_ids=None, **kwargs):
    """flash-attn's semantics, computed with SDPA: varlen (one causal block per packed sequence) exactly when
    transformers' `_is_packed_sequence` says so (one row with restarting positions), else causal per row."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [b, heads, s, d]
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if _is_packed_sequence(position_ids, q.shape[0]):
        segment = torch.cumsum(position_ids[0] == 0, dim=0)
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        mask = causal & (segment[:, None] == segment[None, :])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("softmax_scale"))
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=kwargs.get("softmax_scale"))
    return out.transpose(1, 2)


@pytest.fixture
def lora_model():
    return tiny_lora_llama()


def module_for(model) -> CodeLoRAModule:
    """A CodeLoRAModule around `model`, as configure_model leaves it; a loss chunk of 7 tokens spans rows."""
    module = CodeLoRAModule(loss_chunk_size=7)
    module.model = model
    return module


def files() -> list[np.ndarray]:
    return random_files(0)


def fragments() -> list[tuple[int, int, np.ndarray]]:
    return stream_pieces(files())


def packed_batch() -> dict[str, torch.Tensor]:
    windows = pack_windows([f[:-1] for f in files()], SEQ_LEN, eos_id=EOS, pad_id=PAD)
    labels = window_labels(windows.input_ids, windows.position_ids, windows.n_real, "isolated")
    return {"input_ids": torch.from_numpy(windows.input_ids.astype(np.int64)),
            "position_ids": torch.from_numpy(windows.position_ids.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def alone(tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """One piece of a file as a batch of its own: one row, positions from 0, every token but the first a target."""
    ids = torch.from_numpy(tokens)[None]
    return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "labels": ids.clone()}


def use_attention(model, name: str, monkeypatch) -> None:
    if name.startswith(attention_lib.ATTENTION_IMPLEMENTATION):
        attention_lib.register()
        name = attention_lib.ATTENTION_IMPLEMENTATION
    if name == "flash_attention_2":
        # flash-attn is CUDA-only: its kernel is replaced, transformers' dispatch and packing rule are kept.
        monkeypatch.setattr(flash_integration, "_flash_attention_forward", emulated_flash)
    model.get_base_model().config._attn_implementation = name


def forward(module: CodeLoRAModule, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, S, V] logits, loss sum and target count of a batch through `CodeLoRAModule.hidden_states`, the path
    training takes, with the module's own loss (`loss_sum` is these two calls) from the same hidden states."""
    hidden, labels = module.hidden_states(batch)
    head = module.causal_lm.get_output_embeddings()
    loss, n = causal_lm_loss_sum(hidden, head, labels, module.hparams.loss_chunk_size)
    return head(hidden).reshape(*batch["input_ids"].shape, -1), loss, n


def lora_grads(module: CodeLoRAModule, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_the_rows_hold_one_two_and_three_files():
    """The layout the tests below rely on, checked against the packing: 5 rows, the tokens where the stream puts
    them, and the padding only in the last row."""
    batch = packed_batch()
    starts = [[c for r, c, _ in fragments() if r == row] for row in range(len(batch["input_ids"]))]
    assert starts == [[0], [0, 9], [0, 5, 11], [0], [0, 4]]
    for row, column, tokens in fragments():
        assert batch["input_ids"][row, column:column + len(tokens)].tolist() == tokens.tolist()
    assert batch["input_ids"][-1, 10:].tolist() == [PAD] * 6


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_file_in_a_packed_batch_sees_only_itself(lora_model, attention, monkeypatch):
    """Logits file by file; the loss, target count and LoRA gradients of the whole batch against the sums of the
    files alone (one forward each way)."""
    use_attention(lora_model, attention, monkeypatch)
    card = emulated_card((7, 5)) if attention.endswith("@7.5") else contextlib.nullcontext()
    with card:
        module = module_for(lora_model)
        logits, loss, n = forward(module, packed_batch())
        packed_grads = lora_grads(module, loss)
        alone_loss, alone_n = torch.zeros(()), 0
        for row, column, tokens in fragments():
            alone_logits, piece_loss, piece_n = forward(module, alone(tokens))
            torch.testing.assert_close(logits[row, column:column + len(tokens)], alone_logits[0], rtol=1e-5, atol=1e-5,
                                       msg=f"{attention}: the file at row {row}, column {column}")
            alone_loss, alone_n = alone_loss + piece_loss, alone_n + int(piece_n)
        # Every token of every piece is a target except the piece's first: no file start, no padding.
        assert n.item() == alone_n == sum(len(t) - 1 for _, _, t in fragments())
        torch.testing.assert_close(loss.detach(), alone_loss.detach(), rtol=1e-5, atol=1e-4)
        reference = lora_grads(module, alone_loss)
        assert len(packed_grads) == 2 * 4 * 2  # A and B of q, k, v, o in 2 layers: the adapters are on the path
        for name, grad in packed_grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5, msg=f"{attention}: {name}")


@torch.no_grad()
def test_flash_attention_at_batch_five_would_leak_without_one_row(lora_model, monkeypatch):
    """The negative control: the emulation reproduces the defect when the batch is passed as five rows."""
    batch = packed_batch()
    use_attention(lora_model, "flash_attention_2", monkeypatch)
    rows = lora_model.get_base_model()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                       use_cache=False).logits
    isolated = forward(module_for(lora_model), batch)[0]
    assert (rows - isolated).abs().max() > 1e-2, "rows under flash attention attend across files"


def test_one_row_keeps_the_targets(lora_model, monkeypatch):
    batch = packed_batch()
    use_attention(lora_model, "flash_attention_2", monkeypatch)
    hidden, labels = module_for(lora_model).hidden_states(batch)
    n_rows = batch["input_ids"].shape[0]
    assert hidden.shape[:2] == labels.shape == (1, n_rows * SEQ_LEN)
    # The same targets as the rows (each row's first label was never one; it is masked, not shifted in).
    assert int((labels[:, 1:] != -100).sum()) == int((batch["labels"][:, 1:] != -100).sum())
    assert (labels[0, SEQ_LEN::SEQ_LEN] == -100).all()
