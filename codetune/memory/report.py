"""How a memory plan reads on the console: one line per term, the peak, and whether it fits the free memory.

A plan on a card is a VRAM table in GiB, the CUDA context included; a CPU plan (`TrainingShape.device == "cpu"`) is
a RAM table, without the rows that are zero and in MiB under 1 GiB, checked against the available RAM.
"""

from __future__ import annotations

from codetune.memory.shapes import (ALLOCATOR_MARGIN, CPU_RSS_FACTOR, CPU_RSS_OVERHEAD_BYTES, FP32, TERM_LABELS,
                                    MemoryPlan, TrainingShape)
from codetune.memory.units import GiB, MiB, gib


def format_plan(plan: MemoryPlan, free_bytes: int | None = None, after_load: bool = False) -> str:
    """A human summary: one line per term, the predicted peak, and whether it fits `free_bytes` (read on an
    empty card, or with the model loaded if `after_load`), the allocator margin included. A CPU plan is
    `format_ram_plan`'s."""
    if plan.training.device == "cpu":
        return format_ram_plan(plan, free_bytes)
    lines = [_plan_header(plan)]
    lines += [f"  {TERM_LABELS[name]:<22} {gib(size):>8} GiB" for name, size in plan.terms().items()]
    lines.append(f"  {'peak':<22} {gib(plan.total):>8} GiB  (* only the largest counts)")
    if free_bytes is not None:
        needed = plan.required_free_bytes(after_load)
        verdict = "fits" if needed <= free_bytes else "does NOT fit"
        state = "free with the model loaded" if after_load else "free"
        lines.append(f"  {verdict} in {gib(free_bytes)} GiB {state}: needs {gib(needed)} GiB with the "
                     f"{ALLOCATOR_MARGIN:.0%} allocator margin (expandable segments; {gib(free_bytes - needed)} "
                     f"GiB left)")
    return "\n".join(lines)


def format_ram_plan(plan: MemoryPlan, available_bytes: int | None = None) -> str:
    """The summary of a CPU plan: RAM, not a card, so no CUDA context and no row that is zero; in MiB under 1 GiB
    (a tiny model's rows would all read 0.00 GiB); with `available_bytes` (read with the model loaded), whether
    `required_ram_bytes` fits it."""
    unit, scale = ("GiB", GiB) if plan.total >= GiB else ("MiB", MiB)
    lines = [_plan_header(plan)]
    lines += [f"  {TERM_LABELS[name]:<22} {size / scale:>8.2f} {unit}" for name, size in plan.terms().items() if size]
    lines.append(f"  {'peak':<22} {plan.total / scale:>8.2f} {unit}  (* only the largest counts)")
    if available_bytes is not None:
        needed = plan.required_ram_bytes()
        verdict = "fits" if needed <= available_bytes else "does NOT fit"
        lines.append(f"  {verdict} in {gib(available_bytes)} GiB of available RAM: needs {gib(needed)} GiB once the "
                     f"model is loaded (what is left to allocate x{CPU_RSS_FACTOR:g} + "
                     f"{CPU_RSS_OVERHEAD_BYTES // MiB} MiB for the heap)")
    return "\n".join(lines)


def _plan_header(plan: MemoryPlan) -> str:
    tr = plan.training
    chunk = "none" if tr.loss_chunk_size is None else str(tr.loss_chunk_size)
    return (f"memory plan: micro-batch {tr.micro_batch_size} x {tr.seq_len} tokens, {tr.quantization}, "
            f"{_dtype_label(tr)}, LoRA r{tr.lora_rank}, dropout {tr.lora_dropout:g}, "
            f"checkpointing {'on' if tr.gradient_checkpointing else 'off'}, loss chunk {chunk}, "
            f"{tr.attn_implementation}{' (packed)' if tr.packed_windows else ''}{_repeated_kv_label(plan)}")


def _repeated_kv_label(plan: MemoryPlan) -> str:
    tr, model = plan.training, plan.model
    repeated = tr.attn_implementation == "sdpa" and (tr.packed_windows or tr.unmasked_kernel == "efficient")
    grouped = model.num_key_value_heads != model.num_attention_heads
    return f", k/v repeated to {model.num_attention_heads} heads" if repeated and grouped else ""


def _dtype_label(training: TrainingShape) -> str:
    return "fp32" if training.compute_dtype_bytes == FP32 else "16-bit autocast"
