"""The check's pure arithmetic: FLOPs per token, card peaks, loss verdicts, the OOM section's cap, file segments of
a packed window, and measured peaks against a plan. Plain inputs and outputs, tested without a card."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from codetune.memory.units import GiB

from .settings import DENSE_16BIT_PEAK_TFLOPS, GB, PLAN_TOLERANCE


def flops_per_token(model_config: dict[str, Any], seq_len: int, lora_rank: int, lora_targets: Sequence[str],
                    checkpointing: bool, chunked_loss: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token of a frozen-base LoRA step (the formula is in
    `gpucheck.training`'s docstring)."""
    from codetune.memory.persistent import lora_parameter_count

    shape = model_shape(model_config)
    linear = shape.num_hidden_layers * sum(i * o for i, o, _ in shape.projections().values())
    head = shape.vocab_size * shape.hidden_size
    attention = 2 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_size * seq_len
    lora = lora_parameter_count(shape, lora_rank, tuple(lora_targets))
    model = (2 * linear + 2 * head + attention) + (2 * linear + 2 * head + 2 * attention) + 6 * lora
    recompute = (2 * head if chunked_loss else 0) + ((2 * linear + attention + 2 * lora) if checkpointing else 0)
    return float(model), float(model + recompute)


def peak_tflops(device_name: str | None) -> tuple[float, str] | None:
    """The card's dense 16-bit peak and what it counts, or None for a card not in the table."""
    for fragment, tflops, note in DENSE_16BIT_PEAK_TFLOPS:
        if device_name and fragment in device_name:
            return tflops, note
    return None


def loss_verdict(losses: Sequence[float | None]) -> tuple[bool, bool]:
    """(every loss finite, the last below the first)."""
    finite = bool(losses) and all(x is not None and math.isfinite(x) for x in losses)
    return finite, finite and len(losses) > 1 and losses[-1] < losses[0]


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def plan_cap_between(small_plan_bytes: int, large_plan_bytes: int, measured_over_planned: float = 1.0) -> int:
    """An allocator cap halfway between two plans. Each plan counts the CUDA context, which the allocator's cap
    does not; the rest is scaled by what a measured run held per planned byte (1.0 before any measurement)."""
    from codetune.memory.persistent import CUDA_CONTEXT_BYTES

    return int(measured_over_planned * ((small_plan_bytes + large_plan_bytes) / 2 - CUDA_CONTEXT_BYTES))


def file_segments(position_ids: np.ndarray, n_real: int) -> list[tuple[int, int]]:
    """[start, end) of each run of positions 0, 1, 2... in one packed window (a file, or the part of one the
    window holds), padding left out."""
    starts = [i for i in range(n_real) if position_ids[i] == 0] + [n_real]
    return [(a, b) for a, b in zip(starts, starts[1:])]


def model_shape(model_config: dict[str, Any]):
    """The memory plan's `ModelShape` of a Qwen2 config given as a dict (a config.json's contents)."""
    from transformers import Qwen2Config

    from codetune.memory.shapes import ModelShape

    return ModelShape.from_config(Qwen2Config.from_dict(model_config))


def memory_figures(vram: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Measured peaks (the manifest's `phase_4_training.vram`, GB) against the plan (`phase_3_model.vram_plan`,
    GiB), in GiB; the ratio is allocated / (plan - its CUDA context term)."""
    figures = {"peak_allocated_gib": _gb_to_gib(vram.get("peak_torch_allocated_gb")),
               "peak_reserved_gib": _gb_to_gib(vram.get("peak_torch_reserved_gb")),
               "peak_nvml_gib": _gb_to_gib(vram.get("peak_vram_gb")), "device_name": vram.get("device_name"),
               "plan_gib": plan.get("predicted_peak_gib"),
               "plan_context_gib": (plan.get("terms_gib") or {}).get("cuda_context")}
    if figures["plan_gib"] and figures["peak_allocated_gib"]:
        expected = figures["plan_gib"] - (figures["plan_context_gib"] or 0.0)
        figures["plan_ratio"] = figures["peak_allocated_gib"] / expected
        figures["plan_within_10pct"] = abs(figures["plan_ratio"] - 1) <= PLAN_TOLERANCE
    return figures


def _gb_to_gib(gb: float | None) -> float | None:
    return None if gb is None else gb * GB / GiB


def memory_text(m: dict[str, Any]) -> str:
    """`memory_figures` as the table's words."""
    if m.get("plan_ratio") is None:
        return "no VRAM figures (monitor off?)"
    return (f"alloc {m['peak_allocated_gib']:.2f} / reserved {m['peak_reserved_gib']:.2f} / NVML "
            f"{m['peak_nvml_gib']:.2f} GiB vs plan {m['plan_gib']:.2f} (ratio {m['plan_ratio']:.3f})")
