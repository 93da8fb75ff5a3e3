"""What `--to vllm` checks, without a trained run: the --max-lora-rank it prints and what vLLM refuses."""

from __future__ import annotations

import pytest
import torch

from codetune.export.adapter import Adapter
from codetune.export.vllm import vllm_max_lora_rank, vllm_problems


@pytest.mark.parametrize(("rank", "flag"), [(1, 1), (2, 8), (8, 8), (12, 16), (320, 320), (500, 512)])
def test_vllm_max_lora_rank_is_the_smallest_allowed_value_that_holds_the_rank(rank, flag):
    assert vllm_max_lora_rank(Adapter({"r": rank, "lora_alpha": 16}, (), ())) == flag


def test_layers_trained_in_full_come_first_among_vllms_refusals():
    adapter = Adapter({"r": 8, "lora_alpha": 16, "use_dora": True},
                      (), {"model.embed_tokens.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)})
    problems = vllm_problems(adapter)
    assert [p.split(" (")[0] for p in problems] == ["the adapter trains ['embed_tokens', 'lm_head'] in full",
                                                    "the adapter is DoRA"]
    assert vllm_problems(Adapter({"r": 8, "lora_alpha": 16}, (), {})) == []
