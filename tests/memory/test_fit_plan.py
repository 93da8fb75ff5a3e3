"""The plan `fit` makes once its model is loaded, without the LightningModule: the micro-batch and checkpointing it
chooses, the manifest's record, what it prints, and what stops a run (`codetune.memory.fit_plan`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest

from codetune.errors import ConfigError
from codetune.memory.estimate import plan_memory
from codetune.memory.fit_plan import FitPlan, plan_fit, plan_record, ram_plan_message, smallest_free_memory
from codetune.memory.search import largest_fitting
from codetune.memory.shapes import ModelShape, TrainingShape
from codetune.memory.units import GiB, gib
from codetune.model.tiny import tiny_config

CONFIG = tiny_config(512, max_position_embeddings=4096)
SHAPE = ModelShape.from_config(CONFIG)
# The demo's settings as fit resolves them on the CPU (fp32, unquantized, AdamW), on a card or on the CPU.
CARD = TrainingShape(seq_len=64, micro_batch_size=1, quantization="none", compute_dtype_bytes=4, lora_dropout=0.0,
                     optimizer="adamw", device="cuda")
CPU = replace(CARD, device="cpu")


def _no_reduce(local: int) -> int:
    raise AssertionError("one process has no other rank to ask")


def test_one_process_plans_for_its_own_card():
    assert smallest_free_memory(5 * GiB, 1, _no_reduce) == 5 * GiB


def test_ranks_plan_for_the_smallest_card(caplog):
    with caplog.at_level(logging.INFO):
        assert smallest_free_memory(8 * GiB, 2, lambda local: 3 * GiB) == 3 * GiB
    assert ("the memory plan is made for the smallest free memory of the 2 ranks' cards, 3.00 GiB (rank 0's: "
            "8.00 GiB)") in caplog.text


def test_batch_size_auto_on_a_card_takes_the_largest_micro_batch_that_fits(caplog):
    need = {m: plan_memory(SHAPE, replace(CARD, micro_batch_size=m)).required_free_bytes(after_load=True)
            for m in (3, 6)}
    free = (need[3] + need[6]) // 2
    with caplog.at_level(logging.INFO):
        chosen = plan_fit(CONFIG, CARD, free=free, ram=None, effective_batch=6, checkpointing="auto", device="cuda:0")
    expected = largest_fitting(6, free, SHAPE, CARD, True, after_load=True)
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing) == (3, False) == (
        expected.micro_batch_size, expected.plan.training.gradient_checkpointing)
    assert chosen.record == plan_record(expected.plan, free, need[3], "VRAM")
    assert f"codetune: --data.batch_size auto: micro-batch 3 x 2 accumulation fits {gib(free)} GiB free." in caplog.text
    assert "codetune VRAM plan (micro-batch 3, gradient checkpointing off by the plan):\nmemory plan:" in caplog.text


def test_a_card_plan_that_does_not_fit_warns_and_trains_at_the_given_micro_batch():
    with pytest.warns(UserWarning, match="expect OOM back-offs"):
        chosen = plan_fit(CONFIG, replace(CARD, micro_batch_size=4), free=1, ram=None, effective_batch=None,
                          checkpointing=False, device="cuda:0")
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing) == (4, False)
    assert chosen.record["memory"] == "VRAM" and chosen.record["free_gib"] == 0.0


def test_batch_size_auto_without_a_card_is_the_whole_batch(caplog):
    with caplog.at_level(logging.INFO):
        chosen = plan_fit(CONFIG, CPU, free=None, ram=64 * GiB, effective_batch=6, checkpointing="auto", device="cpu")
    plan = plan_memory(SHAPE, replace(CPU, micro_batch_size=6))
    assert chosen == FitPlan(plan_record(plan, 64 * GiB, plan.required_ram_bytes(), "RAM"), False, 6)
    assert "codetune: --data.batch_size auto on cpu: no card to fit, micro-batch 6." in caplog.text


def test_a_cpu_plan_larger_than_the_ram_stops_with_what_to_lower():
    plan = plan_memory(SHAPE, replace(CPU, micro_batch_size=2))
    with pytest.raises(ConfigError) as raised:
        plan_fit(CONFIG, plan.training, free=None, ram=GiB // 1024, effective_batch=None, checkpointing="auto",
                 device="cpu")
    assert str(raised.value) == ram_plan_message(plan, GiB // 1024, "auto")
    with_it = plan_memory(SHAPE, replace(plan.training, gradient_checkpointing=True))
    assert ("Lower --data.seq_len (now 64), or --data.batch_size (now 2), or --model.gradient_checkpointing true "
            f"(now auto; {gib(with_it.required_ram_bytes())} GiB), or close other programs") in str(raised.value)


def test_an_unreadable_ram_is_not_checked_but_said():
    with pytest.warns(UserWarning, match="the available RAM cannot be read here"):
        chosen = plan_fit(CONFIG, CPU, free=None, ram=None, effective_batch=None, checkpointing=True, device="cpu")
    assert chosen.record["free_gib"] is None and chosen.record["memory"] == "RAM"


@pytest.mark.parametrize(("config", "training"), [(SimpleNamespace(model_type="mamba"), CARD),
                                                  (CONFIG, replace(CARD, lora_target_modules=("c_attn",)))])
def test_without_a_plan_a_given_micro_batch_trains_on(config, training):
    with pytest.warns(UserWarning, match="no VRAM plan for this model") as warned:
        chosen = plan_fit(config, training, free=8 * GiB, ram=None, effective_batch=None, checkpointing="auto",
                          device="cuda:0")
    assert chosen == FitPlan(None, True, 1)
    assert "--model.gradient_checkpointing auto turns it on (no card)" in str(warned[0].message)


def test_without_a_plan_batch_size_auto_is_an_error():
    with pytest.raises(ConfigError, match="--data.batch_size auto needs a VRAM plan"):
        plan_fit(SimpleNamespace(), CARD, free=8 * GiB, ram=None, effective_batch=6, checkpointing=False,
                 device="cuda:0")
