"""Packed windows at micro-batch > 1: no token attends to another file, through the module's own decoder + LoRA
path, for eager, sdpa and flash attention (emulated on the CPU with transformers' own packed-sequence rule)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.flash_attention as flash_integration
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from codetune.data.packing import pack_windows, window_labels
from codetune.model.loading import apply_lora
from codetune.model.module import CodeLoRAModule

SEQ_LEN = 16
FILE_LENGTHS = (6, 4, 9, 3, 5)  # + one EOS each: 32 tokens, two windows of 16, several files per row


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
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = apply_lora(LlamaForCausalLM(config), 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():  # LoRA B starts at zero; random B makes the adapters part of the path under test
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model.eval()


def packed_batch() -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    files = [rng.integers(1, 90, n).astype(np.int32) for n in FILE_LENGTHS]
    windows = pack_windows(files, SEQ_LEN, eos_id=95, pad_id=0)
    labels = window_labels(windows.input_ids, windows.position_ids, windows.n_real, "isolated")
    batch = {"input_ids": torch.from_numpy(windows.input_ids.astype(np.int64)),
             "position_ids": torch.from_numpy(windows.position_ids.astype(np.int64)),
             "labels": torch.from_numpy(labels)}
    assert batch["input_ids"].shape == (2, SEQ_LEN)
    return batch, files


def use_attention(model, name: str, monkeypatch) -> None:
    if name == "flash_attention_2":
        # flash-attn is CUDA-only: its kernel is replaced, transformers' dispatch and packing rule are kept.
        monkeypatch.setattr(flash_integration, "_flash_attention_forward", emulated_flash)
    model.get_base_model().config._attn_implementation = name


def module_logits(model, batch) -> torch.Tensor:
    """[B, S, V] logits through `CodeLoRAModule.hidden_states`, the path training takes."""
    module = SimpleNamespace(causal_lm=model.get_base_model())
    hidden, _ = CodeLoRAModule.hidden_states(module, batch)
    logits = model.get_base_model().get_output_embeddings()(hidden)
    return logits.reshape(*batch["input_ids"].shape, -1)


def files_in_windows(batch) -> list[tuple[int, int, int]]:
    """(row, start, length) of every file that starts inside a window (its tokens up to the window's end)."""
    spans = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [SEQ_LEN]
        spans += [(row, a, b - a) for a, b in zip(starts, starts[1:])]
    return spans


@pytest.mark.parametrize("attention", ["eager", "sdpa", "flash_attention_2"])
@torch.no_grad()
def test_every_file_in_a_packed_batch_sees_only_itself(lora_model, attention, monkeypatch):
    batch, _ = packed_batch()
    use_attention(lora_model, attention, monkeypatch)
    packed = module_logits(lora_model, batch)
    spans = files_in_windows(batch)
    assert len(spans) >= 6 and {row for row, _, _ in spans} == {0, 1}
    for row, start, length in spans:
        alone = {k: v[row:row + 1, start:start + length] for k, v in batch.items()}
        torch.testing.assert_close(packed[row, start:start + length], module_logits(lora_model, alone)[0],
                                   rtol=1e-5, atol=1e-5, msg=f"{attention}: file at row {row}, token {start}")


@torch.no_grad()
def test_flash_attention_at_batch_two_would_leak_without_one_row(lora_model, monkeypatch):
    """The negative control: the emulation reproduces the defect when the batch is passed as two rows."""
    batch, _ = packed_batch()
    use_attention(lora_model, "flash_attention_2", monkeypatch)
    rows = lora_model.get_base_model()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                       use_cache=False).logits
    isolated = module_logits(lora_model, batch)
    assert (rows - isolated).abs().max() > 1e-2, "two rows under flash attention attend across files"


def test_one_row_keeps_the_targets(lora_model, monkeypatch):
    batch, _ = packed_batch()
    use_attention(lora_model, "flash_attention_2", monkeypatch)
    hidden, labels = CodeLoRAModule.hidden_states(SimpleNamespace(causal_lm=lora_model.get_base_model()), batch)
    assert hidden.shape[:2] == labels.shape == (1, 2 * SEQ_LEN)
    # The same targets as the two rows (each row's first label was never one; it is masked, not shifted in).
    assert int((labels[:, 1:] != -100).sum()) == int((batch["labels"][:, 1:] != -100).sum())
    assert labels[0, SEQ_LEN] == -100
