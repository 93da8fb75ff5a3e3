"""Section a, **training** with `configs/training_config_rust.yaml` (4 x 4096, NF4, r16, checkpointing, 8-bit
AdamW) and `configs/training_config.yaml` (8 x 2048), each as shipped on the whole card and on the emulated card
at the largest micro-batch the VRAM plan fits (`codetune.memory.search.largest_micro_batch`, effective batch kept;
the default config with checkpointing on when nothing fits without, as the README advises).

Figures: peak allocated, reserved and NVML-used memory (the manifest's `phase_4_training.vram`, read every step
from the first training step on) against the plan (`phase_3_model.vram_plan`); the ratio is allocated / (plan -
CUDA context), the plan's own error target, and must be within 10%. Training tokens/s over the steps after the
first (the first pays for kernel selection and the allocator's growth); the training loss finite at every step,
and the held-out loss falling: the base's (adapter off, before the first step) against the tuned one's after the
last, on the same windows of a few held-out files (`--data.val_fraction 0.03`; a random base's training losses
differ more between batches than a few steps change them). `--model.warmup_steps 0`, so the first step already
learns.

MFU = FLOPs per token x tokens/s / the card's dense 16-bit peak (`DENSE_16BIT_PEAK_TFLOPS`; "unknown" for other
cards). FLOPs per token of a frozen-base LoRA step (`arithmetic.flops_per_token`), with N the decoder's
projection weights (all layers), V h the (tied) output head, r-rank adapters of N_lora values, s the window::

    forward            2 N + 2 V h + 2 L n_heads d_head s        (attention: QK^T and AV, causal: s/2 keys)
    backward           2 N + 2 V h + 4 L n_heads d_head s        (input gradients only: the base is frozen)
    LoRA               6 N_lora                                   (forward, input and weight gradients)
    MFU counts those; HFU adds what is computed twice: the head in the chunked loss's backward (2 V h)
    and, with checkpointing, every layer's forward (2 N + 2 L n_heads d_head s + 2 N_lora).

Packed windows make attention block-diagonal; the kernels still run the causal window, which is what is counted.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from codetune.memory.units import GiB

from .arithmetic import flops_per_token, loss_verdict, memory_text, peak_tflops
from .fits import Context, FitResult, budgeted, run_fit
from .planning import fit_on_card
from .row import FAIL, NEEDS_CUDA, PASS, Row, fmt, pct
from .settings import DEFAULT_CONFIG, RUST_CONFIG, FitSpec


def section_training(ctx: Context) -> list[Row]:
    capability = torch.cuda.get_device_capability(0) if ctx.cuda else None
    rows = []
    for label, config in (("rust", RUST_CONFIG), ("default", DEFAULT_CONFIG)):
        shipped = FitSpec(f"a-{label}-shipped", config, steps=ctx.mode.train_steps)
        check = f"{label} config as shipped, whole card"
        rows.append(budgeted(ctx, check, partial(_training_row, ctx, shipped, check)))
        rows.append(_card_row(ctx, shipped, label, capability))
    return rows


def _card_row(ctx: Context, shipped: FitSpec, label: str, capability: tuple[int, int] | None) -> Row:
    """The shipped config at the largest micro-batch the plan fits on the emulated card, under its cap."""
    capped, note = fit_on_card(shipped, ctx, capability)
    check = f"{label} config on a {ctx.mode.card_gib:g} GiB card"
    if not ctx.cuda:
        return Row("a", check, NEEDS_CUDA, f"the plan would run {note}")
    check += f" ({note})"
    return budgeted(ctx, check, partial(_training_row, ctx, replace(capped, name=f"a-{label}-card"), check))


def _training_row(ctx: Context, spec: FitSpec, check: str) -> Row:
    run = run_fit(ctx, spec)
    figures = _training_figures(ctx, run, spec)
    base, tuned = figures["held_out_loss_base"], figures["held_out_loss_tuned"]
    ok = figures["loss_finite"] and figures["held_out_falling"]
    measured = [f"{figures['micro_batch_size']} x {figures['gradient_accumulation_steps']} x {figures['seq_len']}",
                f"train loss {fmt(run.losses[0])} -> {fmt(run.losses[-1])}",
                f"held-out {fmt(base)} -> {fmt(tuned)}"]
    if figures["tokens_per_s"] is not None:
        measured.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    criterion = ["train loss finite; held-out loss falling"]
    if ctx.cuda:
        memory = run.memory_figures()
        figures.update(memory)
        ok = ok and bool(memory.get("plan_within_10pct"))
        measured.append(memory_text(memory))
        measured.append(f"MFU {pct(figures['mfu'])}, HFU {pct(figures['hfu'])}")
        criterion.append("allocated / (plan - context) within 10%")
        if figures["oom_backoffs"]:
            measured.append(f"backed off to {figures['final_micro_batch_size']} (the plan was for "
                            f"{figures['micro_batch_size']})")
    else:
        measured.append("memory, MFU: need CUDA")
    return Row("a", check, PASS if ok else FAIL, "; ".join(measured), "; ".join(criterion), figures)


def _training_figures(ctx: Context, run: FitResult, spec: FitSpec) -> dict[str, Any]:
    finite, _ = loss_verdict(run.losses)
    base, tuned = held_out_losses(run.manifest)
    falling = base is not None and tuned is not None and math.isfinite(tuned) and tuned < base
    hp = run.hparams
    figures: dict[str, Any] = {
        "run_dir": str(run.run_dir), "losses": run.losses, "loss_finite": finite, "held_out_loss_base": base,
        "held_out_loss_tuned": tuned, "held_out_falling": falling,
        "micro_batch_size": hp["micro_batch_size"], "final_micro_batch_size": run.steps[-1]["micro_batch_size"],
        "gradient_accumulation_steps": spec.settings()["data.gradient_accumulation_steps"],
        "seq_len": hp["seq_len"], "gradient_checkpointing": run.checkpointing,
        "optimizer": run.manifest["phase_results"]["phase_3_model"].get("optimizer"),
        "quantized_4bit": run.manifest["phase_results"]["phase_3_model"].get("quantized_4bit"),
        "oom_backoffs": run.training.get("oom_backoffs", []), "tokens_per_s": run.tokens_per_s(),
        "cap_gib": None if spec.cap_bytes is None else spec.cap_bytes / GiB,
        "leftover_gib": run.leftover_bytes / GiB,
    }
    figures.update(_mfu_figures(ctx, run))
    return figures


def held_out_losses(manifest: dict[str, Any]) -> tuple[float | None, float | None]:
    """(the base's held-out loss, the tuned model's) from a run's manifest: the base eval's perplexity, and the
    validation loss after the last step."""
    phases = manifest.get("phase_results", {})
    perplexity = ((phases.get("phase_5_evaluation") or {}).get("base") or {}).get("perplexity")
    stats = (phases.get("phase_4_training") or {}).get("training_stats") or {}
    base = math.log(perplexity) if perplexity else None
    return base, stats.get("final_val_loss")


def _mfu_figures(ctx: Context, run: FitResult) -> dict[str, Any]:
    hp = run.hparams
    model, hardware = flops_per_token(ctx.mode.model_config, hp["seq_len"], hp["lora_rank"],
                                      hp["lora_target_modules"], run.checkpointing, hp["loss_chunk_size"] is not None)
    name = torch.cuda.get_device_name(0) if ctx.cuda else None
    peak = peak_tflops(name)
    tps = run.tokens_per_s()
    figures = {"flops_per_token_model": model, "flops_per_token_hardware": hardware,
               "peak_tflops": peak[0] if peak else None, "peak_note": peak[1] if peak else "unknown card",
               "mfu": None, "hfu": None}
    if peak and tps:
        figures["mfu"] = model * tps / (peak[0] * 1e12)
        figures["hfu"] = hardware * tps / (peak[0] * 1e12)
    return figures
