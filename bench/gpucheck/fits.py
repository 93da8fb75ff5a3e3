"""Running a fit: `codetune fit` through the real CLI in this process (`codetune.cli.build_cli`), with the flags
of `COMMON_FIT_FLAGS`, the spec's overrides and a `StepRecorder`, under the spec's allocator cap; `Context`, what
the sections share, and `budgeted`, the way every row goes through the budget."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codetune.memory.units import GiB

from .arithmetic import memory_figures
from .budget import Budget, BudgetSpent
from .recorder import StepRecorder
from .row import Row
from .settings import COMMON_FIT_FLAGS, FitSpec, Mode


@dataclass
class FitResult:
    """What a run left: its directory, manifest, recorded steps and update."""

    spec: FitSpec
    run_dir: Path
    manifest: dict[str, Any]
    steps: list[dict[str, Any]]
    update: torch.Tensor | None
    update_norm: float | None
    scaler_scale: float | None
    precision: str | None
    max_token_id: int | None
    hparams: dict[str, Any]
    leftover_bytes: int = 0
    """Device memory still allocated by earlier runs when this one started (0 when every run released all)."""

    @property
    def losses(self) -> list[float | None]:
        return [s["loss"] for s in self.steps]

    @property
    def training(self) -> dict[str, Any]:
        return self.manifest.get("phase_results", {}).get("phase_4_training", {})

    @property
    def checkpointing(self) -> bool:
        """Whether the model ran with gradient checkpointing (the manifest's, whatever the flag said)."""
        return bool(self.manifest.get("phase_results", {}).get("phase_3_model", {}).get("gradient_checkpointing"))

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.manifest.get("phase_results", {}).get("phase_3_model", {}).get("vram_plan")

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the steps after the first (which pays for kernel choice and allocator growth)."""
        timed = self.steps[1:]
        if not timed:
            return None
        return sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)

    def memory_figures(self) -> dict[str, Any]:
        """The run's measured peaks against its plan (`arithmetic.memory_figures`)."""
        return memory_figures(self.training.get("vram") or {}, self.plan or {})


@dataclass
class Context:
    """What the sections share: the mode, the work directory, the model, the corpus, the runs made and the budget."""

    mode: Mode
    work: Path
    model_dir: Path
    corpus: Path
    context_bytes: int
    runs: dict[str, FitResult] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget.unlimited)

    @property
    def cuda(self) -> bool:
        return not self.mode.dry_run

    @property
    def card_cap_bytes(self) -> int:
        """The allocator cap that emulates a `card_gib` card: its size minus the CUDA context already held."""
        return int(self.mode.card_gib * GiB) - self.context_bytes


def budgeted(ctx: Context, check: str, make_row: Callable[[], Row]) -> Row:
    """`make_row()`, or a `skipped: budget` row when the section's time runs out before it or one of its fits."""
    try:
        ctx.budget.check(check)
        return make_row()
    except BudgetSpent as spent:
        release(ctx)
        return ctx.budget.skipped_row(check, spent)


def fit_args(ctx: Context, spec: FitSpec) -> list[str]:
    recorder = {"class_path": f"{StepRecorder.__module__}.{StepRecorder.__name__}",
                "init_args": {"keep_update": spec.keep_update}}
    flags = {**COMMON_FIT_FLAGS, "model.name_or_path": str(ctx.model_dir), "data.repo": str(ctx.corpus),
             "data.cache_dir": str(ctx.work / "token-cache"), "runs_dir": str(ctx.work / "runs"),
             "run_name": spec.name, "trainer.max_steps": str(spec.steps)}
    if ctx.mode.seq_len is not None:
        flags["data.seq_len"] = str(ctx.mode.seq_len)
    flags.update(spec.overrides)
    args = ["fit", "--config", str(spec.config)]
    for flag, value in flags.items():
        args += [f"--{flag}", value]
    return [*args, f"--trainer.callbacks+={json.dumps(recorder)}"]


def run_fit(ctx: Context, spec: FitSpec) -> FitResult:
    """`codetune fit` in this process under the spec's memory cap and environment; the result is kept in ctx.runs.
    Raises `BudgetSpent`, before anything starts, when the section has no time left."""
    ctx.budget.check(f"fit {spec.name}")
    set_cap(ctx, spec.cap_bytes)
    # What earlier runs left on the card would count in this run's peaks.
    leftover = torch.cuda.memory_allocated(0) if ctx.cuda else 0
    try:
        with _environment(spec.env):
            result = _fit(ctx, spec, leftover)
    finally:
        release(ctx)
    ctx.runs[spec.name] = result
    return result


def _fit(ctx: Context, spec: FitSpec, leftover: int) -> FitResult:
    from codetune.cli import build_cli

    with quiet_output():
        cli = build_cli(fit_args(ctx, spec))
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, StepRecorder))
    run_dir = Path(cli.trainer.default_root_dir)
    return FitResult(spec=spec, run_dir=run_dir,
                     manifest=json.loads((run_dir / "MANIFEST.json").read_text(encoding="utf-8")),
                     steps=recorder.steps, update=recorder.update, update_norm=recorder.update_norm,
                     scaler_scale=recorder.scaler_scale, precision=recorder.precision,
                     max_token_id=recorder.max_token_id,
                     hparams=dict(cli.model.hparams), leftover_bytes=leftover)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Within: `env` set in os.environ; after: each variable as it was (unset if it was)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_cap(ctx: Context, cap_bytes: int | None) -> None:
    if not ctx.cuda:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes or total) / total), 0)


def release(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def quiet_output():
    """The phase lines and tables a fit prints go to stderr, so stdout holds the check's table alone."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
