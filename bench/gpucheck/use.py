"""Section e, **`codetune generate`** (NF4 on CUDA) and **`codetune merge`** on a trained run of section a, through
`codetune.__main__.main`.

The merged model's logits equal the unquantized base + adapter's (bf16: within 2e-2 of their scale; fp32: 1e-4),
and the adapter moves them by at least 3 times that ("inconclusive" otherwise: a merge that dropped the update
would pass too). The merge itself runs on the CPU, by design.
"""

from __future__ import annotations

import contextlib
import io
import time
from functools import partial

import torch

from .fits import Context, FitResult, budgeted, release, run_fit, set_cap
from .row import FAIL, INCONCLUSIVE, PASS, Row
from .settings import CONTROL_FACTOR, MERGE_RTOL, RUST_CONFIG, FitSpec

PROMPT = "def analyze_"
MERGE_TEXT = "def analyze_energy(values):\n    total ="


def section_use(ctx: Context) -> list[Row]:
    # A run of section a (the Rust config, NF4 on CUDA), else any earlier one, else a short one of its own (a
    # budget spent before it skips the whole section).
    run = next((r for name, r in ctx.runs.items() if name.startswith("a-rust")), None)
    run = run or next(iter(ctx.runs.values()), None)
    if run is None:
        run = run_fit(ctx, FitSpec("e-run", RUST_CONFIG, steps=2))
    rows = [budgeted(ctx, "codetune generate", partial(_generate_row, ctx, run)),
            budgeted(ctx, "codetune merge", partial(_merge_row, ctx, run))]
    release(ctx)
    return rows


def _generate_row(ctx: Context, run: FitResult) -> Row:
    from codetune.__main__ import main

    set_cap(ctx, None)
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = main(["generate", str(run.run_dir), "--prompt", PROMPT, "--max_new_tokens", "16"])
    text = out.getvalue().strip()
    quantized = bool(run.manifest["phase_results"]["phase_3_model"].get("quantized_4bit"))
    ok = status == 0 and text.startswith(PROMPT) and (quantized or not ctx.cuda)
    return Row("e", f"codetune generate ({'NF4' if quantized else 'unquantized'}, {ctx.mode.device.type})",
               PASS if ok else FAIL, f"exit {status}, {time.perf_counter() - started:.1f} s: {text[:60]!r}",
               "exit 0, prints prompt + completion" + ("; the run's base in NF4" if ctx.cuda else ""),
               {"exit_status": status, "output": text, "run_dir": str(run.run_dir)})


def _merge_row(ctx: Context, run: FitResult) -> Row:
    from transformers import AutoTokenizer

    from codetune.__main__ import main

    dtype_name = "bfloat16" if ctx.cuda else "float32"
    out_dir = ctx.work / "merged"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["merge", str(run.run_dir), "--out", str(out_dir), "--dtype", dtype_name])
    merge_s = time.perf_counter() - started
    if status != 0:
        return Row("e", "codetune merge", FAIL, f"exit {status}", "exit 0", {"exit_status": status})
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = torch.tensor([tokenizer(MERGE_TEXT, add_special_tokens=False)["input_ids"]], device=ctx.mode.device)
    rel, effect = _merge_differences(ctx, run, out_dir, ids, getattr(torch, dtype_name))
    tol = MERGE_RTOL[16 if ctx.cuda else 32]
    verdict = FAIL if rel > tol else (INCONCLUSIVE if effect < CONTROL_FACTOR * rel else PASS)
    return Row("e", f"codetune merge ({dtype_name}) = base + adapter", verdict,
               f"exit 0, {merge_s:.1f} s; logits rel diff {rel:.1e} on {ids.shape[1]} tokens; the adapter "
               f"moves them by {effect:.1e}",
               f"<= {tol:g} of the logits' scale; adapter effect >= {CONTROL_FACTOR:g} x that",
               {"exit_status": status, "rel_diff": rel, "adapter_effect_rel": effect, "merge_s": merge_s})


def _merge_differences(ctx: Context, run: FitResult, out_dir, ids: torch.Tensor,
                       dtype: torch.dtype) -> tuple[float, float]:
    """(max |merged - base with adapter| logits, max |base - base with adapter|), both relative to the largest
    base-with-adapter logit: the merge's error, and what the adapter changes (a merge that dropped it would be off
    by this much)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(ctx.mode.device).eval()
        merged_logits = merged(input_ids=ids).logits.float()
        del merged
        release(ctx)
        base = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype).to(ctx.mode.device)
        tuned = PeftModel.from_pretrained(base, str(run.run_dir / "adapter")).eval()
        tuned_logits = tuned(input_ids=ids).logits.float()
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=ids).logits.float()
        del tuned, base
    scale = float(tuned_logits.abs().max())
    rel = float((merged_logits - tuned_logits).abs().max()) / scale
    effect = float((base_logits - tuned_logits).abs().max()) / scale
    return rel, effect
