"""The knob rules the plan and the module share: the edge of each range is allowed, one step past it is one problem
naming the flag and the value."""

from __future__ import annotations

import pytest

from codetune.memory.checks import lora_dropout_problems, lora_rank_problems, loss_chunk_problems, micro_batch_problems


@pytest.mark.parametrize(("rule", "allowed", "refused", "problem"), [
    (lora_rank_problems, 1, 0, "--model.lora_rank=0: must be >= 1 (e.g. 8 or 16)"),
    (lora_dropout_problems, 0.0, 1.0, "--model.lora_dropout=1.0: must be in [0, 1)"),
    (lora_dropout_problems, 0.99, -0.1, "--model.lora_dropout=-0.1: must be in [0, 1)"),
    (micro_batch_problems, 1, 0, "--data.batch_size=0: must be >= 1"),
    (loss_chunk_problems, None, 0, "--model.loss_chunk_size=0: must be a positive integer or null"),
    (loss_chunk_problems, 1, -5, "--model.loss_chunk_size=-5: must be a positive integer or null"),
])
def test_each_rule_names_its_flag(rule, allowed, refused, problem):
    assert rule(allowed) == []
    assert rule(refused) == [problem]
