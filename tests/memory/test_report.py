"""How a plan reads: the console table of a card plan, and the GiB figures every line, the manifest and --json use."""

from __future__ import annotations

from codetune.memory.estimate import plan_memory
from codetune.memory.report import format_plan
from codetune.memory.shapes import ModelShape, TrainingShape
from codetune.memory.units import GiB, MiB, gib, gib_figure

QWEN = ModelShape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, head_dim=128,
                  qkv_bias=True)


def test_format_plan_prints_every_term_and_the_verdict():
    plan = plan_memory(QWEN, TrainingShape(seq_len=4096, micro_batch_size=4, lora_rank=16, gradient_checkpointing=True))
    text = format_plan(plan, free_bytes=8 * GiB)
    assert f"{plan.total / GiB:.2f} GiB" in text and "fits in 8.00 GiB free" in text
    for line in text.splitlines()[1:-2]:
        assert line.rstrip().endswith("GiB") and "." in line.split()[-2]
    assert "does NOT fit in 6.00 GiB" in format_plan(plan_memory(QWEN, TrainingShape()), free_bytes=6 * GiB)
    assert "fit" not in format_plan(plan)


def test_a_plan_with_free_memory_read_after_the_load_says_so():
    plan = plan_memory(QWEN, TrainingShape(seq_len=4096, micro_batch_size=4, lora_rank=16, gradient_checkpointing=True))
    needed = plan.required_free_bytes(after_load=True)
    last = format_plan(plan, free_bytes=needed, after_load=True).splitlines()[-1]
    assert last == (f"  fits in {gib(needed)} GiB free with the model loaded: needs {gib(needed)} GiB with the 10% "
                    f"allocator margin (expandable segments; 0.00 GiB left)")


def test_gib_reads_two_decimals_and_records_three():
    assert (GiB, MiB) == (2**30, 2**20)
    assert gib(6 * GiB) == "6.00" and gib(GiB + 5 * MiB) == "1.00" and gib(3 * GiB // 2) == "1.50"
    assert gib_figure(GiB + 5 * MiB) == 1.005 and gib_figure(0) == 0.0
