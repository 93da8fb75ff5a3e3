"""The rules of the knobs that both the memory plan (`TrainingShape`) and `CodeLoRAModule` check, stated once.

Each function returns the problems of one value (empty when it is allowed), worded for the CLI flag it comes
from, so that a caller can collect every problem of a configuration and raise once.
"""

from __future__ import annotations


def lora_rank_problems(rank: int) -> list[str]:
    return [] if rank >= 1 else [f"--model.lora_rank={rank}: must be >= 1 (e.g. 8 or 16)"]


def lora_dropout_problems(dropout: float) -> list[str]:
    return [] if 0.0 <= dropout < 1.0 else [f"--model.lora_dropout={dropout}: must be in [0, 1)"]


def micro_batch_problems(micro_batch: int) -> list[str]:
    """A number of windows per forward/backward (`--data.batch_size auto` is resolved before it is checked here)."""
    return [] if micro_batch >= 1 else [f"--data.batch_size={micro_batch}: must be >= 1"]


def loss_chunk_problems(chunk: int | None) -> list[str]:
    if chunk is None or chunk >= 1:
        return []
    return [f"--model.loss_chunk_size={chunk}: must be a positive integer or null"]
