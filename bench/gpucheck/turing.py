"""Section t, **the Turing path on this card**: the Rust config at its own micro-batch (4 x 4096, checkpointing) as
an RTX 2060 trains it, on whatever card is here.

codetune sees compute capability 7.5 (`emulated_turing`: its dtype, attention kernels and VRAM plan are
Turing's), torch's flash and cuDNN SDPA kernels are off as a Turing card has none, `--model.dtype float16` trains
under 16-mixed with a GradScaler (the residual stream scaled), and the allocator is capped at the 6 GiB card.
Every SDPA call is recorded with the kernel torch's dispatcher picks for it
(`codetune.model.attention.record_sdpa_calls`): the count of math-kernel calls must be 0, the losses finite, no
OOM back-off, and the peak within 10% of the plan; tokens/s is reported. On the CPU (dry run) the same fit runs
in fp32 and each call is replayed through torch's rules for 7.5 (`codetune.model.kernels.torch_choice`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from codetune.memory.units import GiB

from .arithmetic import loss_verdict, memory_text
from .fits import Context, FitResult, budgeted, run_fit
from .row import FAIL, PASS, Row, fmt
from .settings import DTYPE_FLAG, RUST_CONFIG, FitSpec

TURING = (7, 5)


def section_turing(ctx: Context) -> list[Row]:
    """The Rust config as an RTX 2060 (compute capability 7.5, 6 GiB) trains it, on whatever card is here."""
    spec = FitSpec("t-turing", RUST_CONFIG, steps=ctx.mode.train_steps, cap_bytes=ctx.card_cap_bytes if ctx.cuda
                   else None, overrides={DTYPE_FLAG: "float16" if ctx.cuda else "float32"})
    check = (f"Turing path: rust config at its own micro-batch, {'float16 + GradScaler, ' if ctx.cuda else ''}"
             f"flash and cuDNN SDPA off, capability 7.5" + (f", {ctx.mode.card_gib:g} GiB cap" if ctx.cuda else ""))
    return [budgeted(ctx, check, partial(_turing_row, ctx, spec, check))]


@contextlib.contextmanager
def emulated_turing(ctx: Context) -> Iterator[list]:
    """Within: codetune sees compute capability 7.5 (its dtype, attention kernels and plan are Turing's), torch's
    flash and cuDNN SDPA kernels are off as a Turing card has none, and every SDPA call is recorded. On the CPU the
    memory-efficient kernel cannot be restricted to, so codetune's request is dropped and its layout kept."""
    import codetune.cli as cli_lib
    import codetune.model.attention as attention_lib
    import codetune.model.module as module_lib

    patched = [(module_lib, "cuda_capability", lambda device=None: TURING),
               (cli_lib, "cuda_capability", lambda device=None: TURING),
               (attention_lib, "device_capability", lambda device: TURING)]
    if not ctx.cuda:
        patched.append((attention_lib, "sdpa_kernel", lambda backends: contextlib.nullcontext()))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    flags = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()
    for owner, name, value in patched:
        setattr(owner, name, value)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with attention_lib.record_sdpa_calls() as calls:
            yield calls
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_cudnn_sdp(flags[1])


def attention_kernels_run(calls: Sequence, capability: tuple[int, int]) -> dict[str, int]:
    """How many recorded SDPA calls each kernel ran: torch's own pick on a card, its rules replayed for
    `capability` on the CPU (`codetune.model.kernels.torch_choice`, with the kernels that were enabled)."""
    from codetune.model.kernels import torch_choice

    counts: dict[str, int] = {}
    for call in calls:
        kernel = call.picked if call.picked is not None else torch_choice(capability, call.call, call.enabled)
        counts[str(kernel)] = counts.get(str(kernel), 0) + 1
    return counts


def _turing_row(ctx: Context, spec: FitSpec, check: str) -> Row:
    with emulated_turing(ctx) as calls:
        run = run_fit(ctx, spec)
    kernels = attention_kernels_run(calls, TURING)
    figures = _turing_figures(run, spec, calls, kernels)
    ok = figures["loss_finite"] and figures["sdpa_calls"] > 0 and figures["math_calls"] == 0
    measured = [f"{figures['micro_batch_size']} x {figures['seq_len']}", f"train loss {fmt(run.losses[0])} -> "
                f"{fmt(run.losses[-1])}", f"{figures['sdpa_calls']} SDPA calls: {kernels}"]
    criterion = ["losses finite; 0 math-kernel attention calls"]
    if figures["tokens_per_s"] is not None:
        measured.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    if ctx.cuda:
        memory = run.memory_figures()
        figures.update(memory)
        ok = ok and bool(memory.get("plan_within_10pct")) and run.precision == "16-mixed" and not figures[
            "oom_backoffs"]
        scale = "none" if run.scaler_scale is None else f"{run.scaler_scale:g}"
        measured += [memory_text(memory), f"{run.precision}, GradScaler scale {scale}"]
        criterion += ["16-mixed", "no OOM back-off", "allocated / (plan - context) within 10%"]
    else:
        measured.append("float32 on the CPU (float16 and memory need CUDA)")
    return Row("t", check, PASS if ok else FAIL, "; ".join(measured), "; ".join(criterion), figures)


def _turing_figures(run: FitResult, spec: FitSpec, calls: Sequence, kernels: dict[str, int]) -> dict[str, Any]:
    finite, _ = loss_verdict(run.losses)
    model = run.manifest["phase_results"]["phase_3_model"]
    return {
        "run_dir": str(run.run_dir), "losses": run.losses, "loss_finite": finite, "sdpa_calls": len(calls),
        "kernels": kernels, "math_calls": kernels.get("math", 0), "precision": run.precision,
        "grad_scaler_scale": run.scaler_scale, "attention": model.get("attention"),
        "float16_residual_scaling": model.get("float16_residual_scaling"), "tokens_per_s": run.tokens_per_s(),
        "micro_batch_size": run.hparams["micro_batch_size"], "seq_len": run.hparams["seq_len"],
        "gradient_checkpointing": run.checkpointing, "oom_backoffs": run.training.get("oom_backoffs", []),
        "cap_gib": None if spec.cap_bytes is None else spec.cap_bytes / GiB,
    }
