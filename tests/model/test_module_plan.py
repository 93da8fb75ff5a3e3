"""The module's own VRAM decisions on an emulated 6 GiB card: `--data.batch_size auto` and
`--model.gradient_checkpointing auto` read the free memory *after* the weights are loaded, so they must compare it
with what training still allocates, not with the whole plan (which holds the weights and the CUDA context again)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from codetune.memory.estimate import plan_memory
from codetune.memory.search import largest_micro_batch
from codetune.memory.shapes import DEFAULT_LORA_TARGETS, ModelShape, training_shape_for
from codetune.memory.units import GiB
from codetune.model.module import CodeLoRAModule

QWEN_1_5B = Path(__file__).resolve().parents[2] / "bench" / "models" / "qwen2.5-coder-1.5b"
CARD = 6 * GiB
CUDA = torch.device("cuda", 0)


def module_on_card(monkeypatch, free_after_load: int, effective_batch: int = 16, **hparams) -> CodeLoRAModule:
    """A module as configure_model leaves it (NF4, bf16, 8-bit AdamW), on a card with `free_after_load`."""
    module = CodeLoRAModule(name_or_path=str(QWEN_1_5B), **hparams)
    module.optimizer_name = "adamw_8bit"
    module._trainer = SimpleNamespace(world_size=1, datamodule=SimpleNamespace(optimizer_batch_size=effective_batch,
                                                                               packing="isolated"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_after_load, CARD))
    return module


def loaded_bytes(**hparams) -> int:
    """What is on the card once the model and its adapters are loaded: the plan's context, weights, adapters."""
    defaults = dict(seq_len=4096, micro_batch_size=1, lora_rank=16, gradient_checkpointing=True, lora_dropout=0.0)
    defaults.update(hparams)
    training = training_shape_for(
        quantized_4bit=True, compute_dtype_bytes=2, lora_target_modules=DEFAULT_LORA_TARGETS, modules_to_save=(),
        optimizer="adamw_8bit", loss_chunk_size=1024, attn_implementation="sdpa", packing="isolated",
        device="cuda", **defaults)
    return plan_memory(ModelShape.from_config(AutoConfig.from_pretrained(QWEN_1_5B)), training).on_card_after_load


def test_batch_size_auto_counts_the_weights_once(monkeypatch):
    rust = dict(seq_len=4096, lora_rank=16, lora_alpha=32, lora_dropout=0.0, gradient_checkpointing=True)
    free = CARD - loaded_bytes()
    module = module_on_card(monkeypatch, free, micro_batch_size="auto", **rust)
    record, checkpointing = module._plan_memory(AutoConfig.from_pretrained(QWEN_1_5B), True, torch.bfloat16, CUDA)
    # The same micro-batch as the plan picks for the empty 6 GiB card before loading anything.
    shape = ModelShape.from_config(AutoConfig.from_pretrained(QWEN_1_5B))
    expected = largest_micro_batch(16, CARD, shape, module._training_shape(1, True, True, torch.bfloat16, CUDA))
    assert expected is not None and module.micro_batch_size == expected.micro_batch_size >= 2
    assert checkpointing is True and record["free_read"] == "after the model was loaded"
    assert record["required_free_gib"] <= free / GiB
    # Comparing the whole plan (weights and context again) with the free memory left after the load chose less.
    whole = largest_micro_batch(16, free, shape, module._training_shape(1, True, True, torch.bfloat16, CUDA))
    assert whole is None or whole.micro_batch_size < module.micro_batch_size


@pytest.mark.parametrize(("seq_len", "micro_batch", "rank", "alpha"), [(2048, 8, 8, 16), (4096, 4, 16, 32)])
def test_both_shipped_shapes_fit_a_6_gib_card_with_checkpointing_auto(monkeypatch, seq_len, micro_batch, rank,
                                                                       alpha):
    free = CARD - loaded_bytes(seq_len=seq_len, lora_rank=rank)
    module = module_on_card(monkeypatch, free, micro_batch_size=micro_batch, seq_len=seq_len, lora_rank=rank,
                            lora_alpha=alpha, lora_dropout=0.0)
    record, checkpointing = module._plan_memory(AutoConfig.from_pretrained(QWEN_1_5B), True, torch.bfloat16, CUDA)
    assert module.micro_batch_size == micro_batch and checkpointing is True  # auto turned it on
    assert record["predicted_peak_gib"] <= 6.0 and record["required_free_gib"] <= free / GiB


def test_checkpointing_auto_stays_off_when_the_step_fits(monkeypatch):
    module = module_on_card(monkeypatch, 120 * GiB, micro_batch_size=1, seq_len=512, lora_dropout=0.0)
    _, checkpointing = module._plan_memory(AutoConfig.from_pretrained(QWEN_1_5B), True, torch.bfloat16, CUDA)
    assert checkpointing is False
