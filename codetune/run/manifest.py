"""The run directory and its MANIFEST.json.

A run directory `runs/<name>/` holds MANIFEST.json, config.yaml, tensorboard/, checkpoints/,
adapter/ and, for the tiny model, base_model/. Every file here is written atomically (a temporary
file or directory in the same folder, then `os.replace`), so a crash never leaves half a manifest
or half an adapter behind.

The manifest is a plain JSON document: `phase_results.<phase>` holds status, start time, wall seconds and its
results (as keys of the phase itself) for each phase (`phase_1_scan` ... `phase_6_export`, the adapter; then
`phase_7_export`, the `codetune export`s); top-level keys hold the run's identity, versions and
`training_time_minutes`. `segments` lists each process that trained the run: the first, then one per resume
(`resumed_from`, `start_step`, `end_step`, `status`, `training_minutes`: time in training steps and
validation, not in the generation eval, which `phase_5_evaluation` times); `training_time_minutes` is their
sum. A segment stopped by Ctrl-C or SIGTERM is `interrupted` (with `interrupted`: the signal, the step, the
checkpoint written or not), and so is the run's `status`; a segment still `running` when the next one starts
was killed: it becomes `interrupted` too, its figures those of its last checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from codetune.storage import CONFIG_NAME, MANIFEST_NAME, atomic_write_text, utc_now

PHASES = ("phase_1_scan", "phase_2_tokenize", "phase_3_model", "phase_4_training", "phase_5_evaluation",
          "phase_6_export", "phase_7_export")
_VERSIONED = ("codetune", "torch", "lightning", "transformers", "peft", "bitsandbytes", "torchmetrics", "tokenizers")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir` from its last checkpoint (or, without one, from its start)."""
    return f"codetune fit --config {Path(run_dir) / CONFIG_NAME} --ckpt_path last"


def default_run_name() -> str:
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path) -> str | None:
    """HEAD of the trained repository, or None when it is not a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


class Manifest:
    """MANIFEST.json of one run directory; every change is written through at once, atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / MANIFEST_NAME
        self.data: dict[str, Any] = {"phase_results": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        self._started: dict[str, float] = {}

    @property
    def phases(self) -> dict[str, Any]:
        return self.data.setdefault("phase_results", {})

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.write()

    def start_phase(self, name: str) -> None:
        self._started[name] = time.perf_counter()
        self.phases[name] = {"status": "running", "started_at": utc_now()}
        self.write()

    def finish_phase(self, name: str, results: dict[str, Any] | None = None, wall_s: float | None = None) -> None:
        phase = self.phases.setdefault(name, {"started_at": utc_now()})
        if wall_s is None and name in self._started:
            wall_s = time.perf_counter() - self._started.pop(name)
        # Results sit directly in the phase: `.phase_results.phase_4_training.training_stats` is the contract.
        phase.update(results or {})
        phase.update(status="completed", wall_s=round(wall_s or 0.0, 3))
        self.write()

    def fail_running_phases(self, error: BaseException) -> None:
        """Mark whatever phase (and segment) was running as failed, naming the error."""
        failed = [n for n, p in self.phases.items() if p.get("status") == "running"]
        message = f"{type(error).__name__}: {error}"
        for name in failed:
            self.phases[name].update(status="failed", error=message)
        if self.segments and self.segments[-1].get("status") == "running":
            self.segments[-1].update(status="failed", finished_at=utc_now())
        self.data.update(status="failed", failed_phase=failed[0] if failed else None, error=message)
        self.write()

    def interrupt_running_phases(self, reason: str, wall_s: dict[str, float] | None = None) -> None:
        """Mark whatever phase (and segment) was running as interrupted by a signal, which is not a failure: the
        run resumes from its last checkpoint. `reason` says when and whether a checkpoint was written; `wall_s`
        gives a phase its wall time (training time, which excludes the evaluation)."""
        interrupted = [n for n, p in self.phases.items() if p.get("status") == "running"]
        for name in interrupted:
            self.phases[name].update(status="interrupted", interrupted=reason)
            if name in (wall_s or {}):
                self.phases[name]["wall_s"] = round(wall_s[name], 3)
        if self.segments and self.segments[-1].get("status") == "running":
            self.segments[-1].update(status="interrupted", interrupted=reason, finished_at=utc_now())
        self.data.update(status="interrupted", interrupted_phase=interrupted[0] if interrupted else None,
                         interrupted=reason)
        self.write()

    # -- segments: one per training process (the first, then each resume) -------------------------

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.data.setdefault("segments", [])

    def start_segment(self, resumed_from: str | None) -> None:
        """A new training process. Resuming, a segment left `running` by an earlier process was killed;
        starting from scratch, earlier segments belonged to another run in this directory and go."""
        if resumed_from is None:
            self.segments.clear()
        for segment in self.segments:
            if segment.get("status") == "running":
                segment["status"] = "interrupted"
        self.segments.append({"segment": len(self.segments) + 1, "status": "running", "started_at": utc_now(),
                              "resumed_from": resumed_from})
        self.write()

    def last_checkpoint(self) -> dict[str, Any] | None:
        """The newest segment that recorded a whole checkpoint (`last_checkpoint`, `end_step`), or None."""
        return next((s for s in reversed(self.segments) if s.get("last_checkpoint")), None)

    def update_segment(self, **values: Any) -> None:
        """Progress of the current segment; `training_time_minutes` becomes the sum over segments."""
        self.segments[-1].update(values)
        total = sum(s.get("training_minutes") or 0.0 for s in self.segments)
        self.data["training_time_minutes"] = round(total, 4)
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
