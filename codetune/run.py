"""The run directory and its MANIFEST.json.

A run directory `runs/<name>/` holds MANIFEST.json, config.yaml, tensorboard/, checkpoints/,
adapter/ and, for the tiny model, base_model/. Every file here is written atomically (a temporary
file or directory in the same folder, then `os.replace`), so a crash never leaves half a manifest
or half an adapter behind.

The manifest is a plain JSON document: `phase_results.<phase>` holds status, start time, wall
seconds and its results (as keys of the phase itself) for each phase (`phase_1_scan` ... `phase_6_export`); top-level keys hold the
run's identity, versions and `training_time_minutes`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "MANIFEST.json"
PHASES = ("phase_1_scan", "phase_2_tokenize", "phase_3_model", "phase_4_training", "phase_5_evaluation",
          "phase_6_export")
_VERSIONED = ("codetune", "torch", "lightning", "transformers", "peft", "bitsandbytes", "torchmetrics", "tokenizers")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, then rename it over `path`: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_save_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` (an old one is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would stay on the renamed directory; mkdir honours the umask.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_run_name() -> str:
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        """Mark whatever phase was running as failed, naming the error."""
        failed = [n for n, p in self.phases.items() if p.get("status") == "running"]
        for name in failed:
            self.phases[name].update(status="failed", error=f"{type(error).__name__}: {error}")
        self.data.update(status="failed", failed_phase=failed[0] if failed else None,
                         error=f"{type(error).__name__}: {error}")
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
