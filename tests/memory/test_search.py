"""What fits a card: the largest micro-batch of an effective batch, the checkpointing choice, and the free memory
read with the model loaded compared with what is left to allocate (1.5B Qwen2's shape, no model built)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from codetune.errors import ConfigError
from codetune.memory.estimate import plan_memory
from codetune.memory.search import (largest_micro_batch, largest_micro_batch_with_checkpointing_choice,
                                    plan_with_checkpointing_choice)
from codetune.memory.shapes import ALLOCATOR_MARGIN, ModelShape, TrainingShape
from codetune.memory.units import GiB

QWEN = ModelShape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, head_dim=128,
                  qkv_bias=True)


def _needed(training: TrainingShape, micro_batches, after_load: bool = False) -> dict[int, int]:
    return {m: plan_memory(QWEN, replace(training, micro_batch_size=m)).required_free_bytes(after_load)
            for m in micro_batches}


@pytest.mark.parametrize("after_load", [False, True])
def test_largest_micro_batch_picks_the_largest_divisor_that_fits(after_load):
    training = TrainingShape(seq_len=4096, lora_rank=16, gradient_checkpointing=True)
    needed = _needed(training, [1, 2, 3, 4, 6, 8, 12, 16], after_load)
    cases = [  # (effective batch, budget, expected micro-batch)
        (16, needed[16], 16), (16, needed[16] - 1, 8), (16, needed[8] - 1, 4), (16, needed[4], 4),
        (16, needed[1], 1), (16, needed[1] - 1, None),
        (12, needed[8], 6), (12, needed[6] - 1, 4), (12, needed[4] - 1, 3), (6, 10**15, 6), (7, needed[4], 1),
    ]
    for effective, budget, expected in cases:
        choice = largest_micro_batch(effective, budget, QWEN, training, after_load=after_load)
        if expected is None:
            assert choice is None
            continue
        assert choice.micro_batch_size == expected, (effective, budget)
        assert choice.micro_batch_size * choice.gradient_accumulation_steps == effective
        assert choice.plan.required_free_bytes(after_load) == needed[expected]


def test_free_memory_after_the_load_is_compared_with_what_is_left_to_allocate():
    """Free memory read with the model on the card must not pay for the weights again."""
    plan = plan_memory(QWEN, TrainingShape(seq_len=4096, micro_batch_size=4, lora_rank=16,
                                           gradient_checkpointing=True))
    loaded = plan.cuda_context + plan.weights_4bit + plan.weights_16bit + plan.lora_params
    assert plan.on_card_after_load == loaded and plan.to_allocate_after_load == plan.total - loaded
    # The gradients, the optimizer state and the step are what the load leaves to allocate.
    assert plan.to_allocate_after_load == plan.lora_grads + plan.optimizer_state + plan.step
    after = math.ceil(1.1 * plan.to_allocate_after_load)
    assert ALLOCATOR_MARGIN == 0.1 and plan.required_free_bytes(after_load=True) == after
    assert plan.required_free_bytes() == loaded + after
    # A 6 GiB card: empty, 6 GiB free; once loaded, 6 GiB less what the load took.
    card = 6 * GiB
    assert plan.fits(card) is plan.fits_after_load(card - loaded)
    assert plan.fits_after_load(after) and not plan.fits_after_load(after - 1)
    assert plan.fits(loaded + after) and not plan.fits(loaded + after - 1)
    # The old comparison, the whole plan against the free memory after the load, refused what fits.
    free_after_load = plan.total - loaded + (after - plan.to_allocate_after_load)
    assert plan.fits_after_load(free_after_load) and plan.total > free_after_load


def test_checkpointing_is_turned_on_only_when_the_plan_without_it_does_not_fit():
    training = TrainingShape(micro_batch_size=8, gradient_checkpointing=True)
    off = plan_memory(QWEN, replace(training, gradient_checkpointing=False))
    on = plan_memory(QWEN, training)
    assert on.total < 6 * GiB < off.total
    for after_load in (False, True):
        needed_off = off.required_free_bytes(after_load)
        assert plan_with_checkpointing_choice(QWEN, training, needed_off, after_load) == (off, False)
        assert plan_with_checkpointing_choice(QWEN, training, needed_off - 1, after_load) == (on, True)
    # Nothing fits: checkpointing on, the smaller plan, for the caller to warn about.
    assert plan_with_checkpointing_choice(QWEN, training, 1 * GiB).gradient_checkpointing is True
    # The default config on an empty 6 GiB card: on; on an 80 GB card: off.
    assert plan_with_checkpointing_choice(QWEN, training, 6 * GiB) == (on, True)
    assert plan_with_checkpointing_choice(QWEN, training, 80 * 10**9) == (off, False)


def test_batch_size_auto_prefers_no_checkpointing_at_any_micro_batch():
    training = TrainingShape(seq_len=2048)
    off = {m: plan_memory(QWEN, replace(training, micro_batch_size=m)).required_free_bytes() for m in (1, 2)}
    choice = largest_micro_batch_with_checkpointing_choice(16, off[2], QWEN, training)
    assert (choice.micro_batch_size, choice.plan.training.gradient_checkpointing) == (2, False)
    choice = largest_micro_batch_with_checkpointing_choice(16, off[1], QWEN, training)
    assert (choice.micro_batch_size, choice.plan.training.gradient_checkpointing) == (1, False)
    # One byte less and nothing fits without checkpointing; with it, the whole batch does.
    choice = largest_micro_batch_with_checkpointing_choice(16, off[1] - 1, QWEN, training)
    assert (choice.micro_batch_size, choice.plan.training.gradient_checkpointing) == (16, True)
    on = {m: plan_memory(QWEN, replace(training, micro_batch_size=m, gradient_checkpointing=True)) for m in (4, 8)}
    choice = largest_micro_batch_with_checkpointing_choice(16, 6 * GiB, QWEN, training)
    assert on[8].fits(6 * GiB) and (choice.micro_batch_size, choice.plan) == (8, on[8])
    assert largest_micro_batch_with_checkpointing_choice(16, 1 * GiB, QWEN, training) is None


def test_largest_micro_batch_needs_a_positive_batch():
    with pytest.raises(ConfigError, match="effective batch 0"):
        largest_micro_batch(0, 8 * GiB, QWEN, TrainingShape())
