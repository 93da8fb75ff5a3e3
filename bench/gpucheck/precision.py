"""Section c, **the Turing path forced**: `--model.dtype float16` (the CLI then trains 16-mixed: a GradScaler,
fp32 LoRA weights) against `--model.dtype bfloat16`, same seed and batches, dropout 0.

Losses finite, the scaler present, and the adapters' update norms in ratio 1 +- 0.1 with cosine >= 0.9 (a scaler
that skipped steps moves the weights less). On CPU, where Lightning cannot train float16, bf16 against fp32 (the
same comparison), plus the pure choice: compute capability 7.5 gets float16 and 16-mixed.
"""

from __future__ import annotations

from functools import partial

import torch

from .arithmetic import loss_verdict
from .fits import Context, budgeted, run_fit
from .row import FAIL, NEEDS_CUDA, PASS, Row, fmt
from .settings import DEFAULT_CONFIG, DROPOUT_FLAG, DTYPE_FLAG, UPDATE_MIN_COSINE, UPDATE_RATIO_TOLERANCE, FitSpec


def section_precision(ctx: Context) -> list[Row]:
    from codetune.model.loading import precision_for, resolve_dtype

    rows = []
    turing = resolve_dtype("auto", "cuda", (7, 5))
    chosen = precision_for(turing)
    rows.append(Row("c", "Turing (7.5): auto dtype and precision", PASS if (turing, chosen) ==
                    (torch.float16, "16-mixed") else FAIL, f"{str(turing).replace('torch.', '')}, {chosen}",
                    "float16, 16-mixed"))
    tested, reference = ("float16", "bfloat16") if ctx.cuda else ("bfloat16", "float32")
    if not ctx.cuda:
        rows.append(Row("c", "float16 training (16-mixed, GradScaler)", NEEDS_CUDA,
                        "Lightning trains 16-mixed as bf16-mixed on CPU; bf16 vs fp32 below instead"))
    check = f"{tested} vs {reference}: adapter updates"
    rows.append(budgeted(ctx, check, partial(_precision_row, ctx, tested, reference, check)))
    return rows


def _precision_row(ctx: Context, tested: str, reference: str, check: str) -> Row:
    from codetune.model.loading import precision_for

    overrides = {**ctx.mode.precision_window, DROPOUT_FLAG: "0.0"}
    runs = {dtype: run_fit(ctx, FitSpec(f"c-{dtype}", DEFAULT_CONFIG, steps=ctx.mode.precision_steps,
                                        overrides={**overrides, DTYPE_FLAG: dtype}, keep_update=True))
            for dtype in (tested, reference)}
    a, b = runs[tested], runs[reference]
    finite = all(loss_verdict(r.losses)[0] for r in runs.values())
    ratio = a.update_norm / b.update_norm if b.update_norm else float("nan")
    cosine = float(torch.nn.functional.cosine_similarity(a.update, b.update, dim=0))
    scaler_ok = a.scaler_scale is not None if tested == "float16" else a.scaler_scale is None
    precision_ok = a.precision == precision_for(getattr(torch, tested))
    ok = (finite and scaler_ok and precision_ok and abs(ratio - 1) <= UPDATE_RATIO_TOLERANCE
          and cosine >= UPDATE_MIN_COSINE)
    figures = {"tested": tested, "reference": reference, "losses": a.losses, "reference_losses": b.losses,
               "update_norm": a.update_norm, "reference_update_norm": b.update_norm, "update_ratio": ratio,
               "update_cosine": cosine, "grad_scaler_scale": a.scaler_scale,
               "precision": a.precision, "reference_precision": b.precision}
    scaler = f"GradScaler scale {a.scaler_scale:g}" if a.scaler_scale is not None else "no GradScaler"
    return Row("c", check, PASS if ok else FAIL,
               f"{a.precision} vs {b.precision}; loss {fmt(a.losses[-1])} vs {fmt(b.losses[-1])}; update "
               f"norm ratio {ratio:.3f}, cosine {cosine:.3f}; {scaler}",
               f"{precision_for(getattr(torch, tested))}; losses finite; ratio 1 +- {UPDATE_RATIO_TOLERANCE:g}; "
               f"cosine >= {UPDATE_MIN_COSINE:g}" + ("; a GradScaler" if tested == "float16" else ""), figures)
