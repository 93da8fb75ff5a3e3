"""The plan's inputs: `training_shape_for` maps the module's knobs, and every bad value is one error naming its flag."""

from __future__ import annotations

import pytest

from codetune.errors import ConfigError
from codetune.memory.estimate import plan_memory
from codetune.memory.shapes import DEFAULT_LORA_TARGETS, PROJECTIONS, ModelShape, TrainingShape, training_shape_for

QWEN = ModelShape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, head_dim=128,
                  qkv_bias=True)


def test_training_shape_for_maps_the_module_knobs():
    knobs = dict(seq_len=4096, micro_batch_size=4, compute_dtype_bytes=2, lora_rank=16,
                 lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=[],
                 gradient_checkpointing=True, loss_chunk_size=512, attn_implementation="sdpa")
    shape = training_shape_for(**knobs, quantized_4bit=True, optimizer="adamw_8bit", packing="isolated",
                               device="cuda")
    assert shape == TrainingShape(seq_len=4096, micro_batch_size=4, quantization="nf4", compute_dtype_bytes=2,
                                  lora_rank=16, lora_target_modules=("q_proj", "v_proj"), lora_dropout=0.0,
                                  optimizer="adamw_8bit", gradient_checkpointing=True, loss_chunk_size=512,
                                  packed_windows=True, device="cuda")
    other = training_shape_for(**knobs, quantized_4bit=False, optimizer="adamw", packing="concat", device="mps")
    assert (other.quantization, other.optimizer, other.packed_windows, other.device) == ("none", "adamw", False,
                                                                                        "cpu")
    # The paged 8-bit AdamW keeps the same bytes (its paged state is counted as resident).
    paged = training_shape_for(**knobs, quantized_4bit=True, optimizer="paged_adamw_8bit", packing="isolated",
                               device="cuda")
    assert paged == shape



def test_bad_values_are_one_error_naming_the_flags():
    with pytest.raises(ConfigError, match=r"--data.batch_size=0.*--model.lora_rank=0"):
        TrainingShape(micro_batch_size=0, lora_rank=0)
    with pytest.raises(ConfigError, match=r"--model.lora_target_modules=\['c_attn'\]"):
        plan_memory(QWEN, TrainingShape(lora_target_modules=("c_attn",)))
    with pytest.raises(ConfigError, match=r"--model.modules_to_save=\['norm'\]"):
        plan_memory(QWEN, TrainingShape(modules_to_save=("norm",)))


def test_a_rule_shared_with_the_module_reads_the_same_in_the_plan():
    # The rank's wording comes from codetune.memory.checks, which CodeLoRAModule's checks use too.
    with pytest.raises(ConfigError) as raised:
        TrainingShape(lora_rank=0, lora_dropout=1.0, loss_chunk_size=0)
    assert str(raised.value) == ("memory plan: --model.lora_rank=0: must be >= 1 (e.g. 8 or 16); "
                                 "--model.lora_dropout=1.0: must be in [0, 1); "
                                 "--model.loss_chunk_size=0: must be a positive integer or null")


def test_lora_targets_default_to_every_projection_of_a_layer():
    assert DEFAULT_LORA_TARGETS == PROJECTIONS == tuple(QWEN.projections())
