"""Section f, **GPU tests**: `pytest -m gpu tests/gpu` (CUDA only), in a subprocess the budget can stop."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from functools import partial

from .fits import Context, budgeted
from .row import FAIL, NEEDS_CUDA, PASS, Row
from .settings import REPO_ROOT


def section_gpu_tests(ctx: Context) -> list[Row]:
    check = "pytest -m gpu tests/gpu"
    if not ctx.cuda:
        return [Row("f", check, NEEDS_CUDA)]
    return [budgeted(ctx, check, partial(_gpu_tests_row, ctx))]


def _gpu_tests_row(ctx: Context) -> Row:
    """The GPU tests in a subprocess, which, unlike a fit, the budget can stop: at the section's time left."""
    started = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    left = ctx.budget.left_s()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO_ROOT / "tests" / "gpu")],
                              cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path},
                              timeout=None if math.isinf(left) else left)
    except subprocess.TimeoutExpired as expired:
        print(_text(expired.stdout)[-4000:], _text(expired.stderr)[-2000:], sep="\n", file=sys.stderr)
        raise ctx.budget.spent(f"the rest of pytest -m gpu tests/gpu (stopped after {left:.0f} s)") from None
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return Row("f", "pytest -m gpu tests/gpu", PASS if proc.returncode == 0 else FAIL,
               f"{summary} ({time.perf_counter() - started:.0f} s)", "exit 0",
               {"returncode": proc.returncode, "summary": summary})


def _text(output: bytes | str | None) -> str:
    # TimeoutExpired holds what was captured as bytes, even with text=True.
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
