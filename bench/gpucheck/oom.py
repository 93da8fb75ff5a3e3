"""Section b, **a real OOM**: the Rust config with dropout 0 under an allocator cap halfway between the plans of
its micro-batch and of half of it (without their CUDA context term, scaled by section a's measured/planned ratio
for that config on the card when it ran).

The first attempt runs out of memory, `callbacks/oom_backoff.py` redoes the step at half the micro-batch, and the
run ends with the same loss as one started at that micro-batch (relative tolerance `OOM_LOSS_RTOL`: 5e-3 in
16-bit, where the accumulation order differs; 1e-5 in fp32, where the adapters are compared too). On CPU the OOM
is injected at the first step (`CODETUNE_INJECT_OOM=0`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from codetune.memory.units import GiB

from .arithmetic import model_shape, plan_cap_between, relative_difference
from .fits import Context, budgeted, run_fit
from .planning import planned_shape
from .row import FAIL, PASS, Row, fmt
from .settings import DROPOUT_FLAG, EFFECTIVE_BATCH, OOM_LOSS_RTOL, RUST_CONFIG, FitSpec


def section_oom(ctx: Context) -> list[Row]:
    micro = int(FitSpec("b-oom", RUST_CONFIG).settings()["data.batch_size"])
    check = f"OOM at micro-batch {micro} recovered"
    return [budgeted(ctx, check, partial(_oom_row, ctx, check))]


def _oom_specs(ctx: Context) -> tuple[FitSpec, FitSpec, str]:
    """The run that must back off, the reference started at half its micro-batch, and how the OOM comes about."""
    from codetune.memory.backoff import INJECT_OOM_ENV

    no_dropout = {DROPOUT_FLAG: "0.0"}
    full = FitSpec("b-oom", RUST_CONFIG, overrides=no_dropout, steps=ctx.mode.oom_steps)
    micro = int(full.settings()["data.batch_size"])
    half = micro // 2
    accumulation = EFFECTIVE_BATCH // half
    reference = FitSpec("b-reference", RUST_CONFIG, steps=ctx.mode.oom_steps,
                        overrides={**no_dropout, "data.batch_size": str(half),
                                   "data.gradient_accumulation_steps": str(accumulation)})
    if ctx.cuda:
        cap, how = _oom_cap(ctx, full, reference, micro, half)
        return replace(full, cap_bytes=cap), replace(reference, cap_bytes=cap), how
    # The first step, as under the cap.
    return replace(full, env={INJECT_OOM_ENV: "0"}), reference, f"{INJECT_OOM_ENV}=0 (CPU)"


def _oom_cap(ctx: Context, full: FitSpec, reference: FitSpec, micro: int, half: int) -> tuple[int, str]:
    """The allocator cap between the two runs' plans, and a note of how it was set."""
    from codetune.memory.estimate import plan_memory

    shape = model_shape(ctx.mode.model_config)
    capability = torch.cuda.get_device_capability(0)
    large = plan_memory(shape, planned_shape(full, ctx.mode, capability)).total
    small = plan_memory(shape, planned_shape(reference, ctx.mode, capability)).total
    # Section a's measurement of the same config on the card, when there is one, corrects the plan.
    measured = ctx.runs.get("a-rust-card")
    ratio = (measured.memory_figures().get("plan_ratio") if measured else None) or 1.0
    cap = plan_cap_between(small, large, ratio)
    return cap, (f"cap {cap / GiB:.2f} GiB (plans: {half} windows {small / GiB:.2f}, {micro} windows "
                 f"{large / GiB:.2f} GiB; x {ratio:.3f} measured/planned)")


def _oom_row(ctx: Context, check: str) -> Row:
    full, reference, how = _oom_specs(ctx)
    micro, half = (int(spec.settings()["data.batch_size"]) for spec in (full, reference))
    oom = run_fit(ctx, full)
    ref = run_fit(ctx, reference)
    bits = 32 if oom.hparams["dtype"] == "float32" or (not ctx.cuda and oom.hparams["dtype"] == "auto") else 16
    rtol = OOM_LOSS_RTOL[bits]
    events = oom.training.get("oom_backoffs", [])
    backed_off = any(e.get("micro_batch_size") == half and e.get("reason") == "oom" for e in events)
    diff = relative_difference(oom.losses[-1], ref.losses[-1])
    figures = {"how": how, "oom_backoffs": events, "losses": oom.losses, "reference_losses": ref.losses,
               "final_loss_rel_diff": diff, "rtol": rtol, "micro_batch_sizes": [s["micro_batch_size"]
                                                                               for s in oom.steps]}
    ok = backed_off and diff <= rtol and all(s["micro_batch_size"] == half for s in oom.steps
                                             if s["step"] > events[0]["step"])
    if bits == 32:
        figures["adapter_max_abs_diff"] = _adapter_difference(oom.run_dir, ref.run_dir)
        ok = ok and figures["adapter_max_abs_diff"] <= 1e-5
    measured = (f"{how}: {'backed off ' + str(micro) + ' -> ' + str(half) if backed_off else 'NO back-off'}; "
                f"final loss {fmt(oom.losses[-1])} vs {fmt(ref.losses[-1])} started at {half} (rel {diff:.1e})")
    if "adapter_max_abs_diff" in figures:
        measured += f"; adapters within {figures['adapter_max_abs_diff']:.1e}"
    return Row("b", check, PASS if ok else FAIL, measured,
               f"one back-off to {half}; final loss rel diff <= {rtol:g}" + ("; adapters <= 1e-5" if bits == 32
                                                                              else ""), figures)


def _adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
