"""What an export wrote, as its marker (`codetune_export.json`) and the run's MANIFEST.json record it: each file
with its size and sha256, under `phase_7_export.exports`, one entry per output directory (an export to the same
directory replaces its entry).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetune.run.manifest import Manifest

EXPORT_PHASE = "phase_7_export"


@dataclass(frozen=True)
class Exported:
    """What an export wrote and what to tell the user."""

    details: dict[str, Any]
    """Target-specific facts for the manifest (tensor types, the serve command...)."""
    next_steps: list[str]


def file_records(directory: Path) -> list[dict[str, Any]]:
    """Each file under `directory`: its path there, size and sha256."""
    records = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        records.append({"file": path.relative_to(directory).as_posix(), "bytes": path.stat().st_size,
                        "sha256": digest.hexdigest()})
    return records


def record_export(run_dir: Path, entry: dict[str, Any]) -> None:
    """Add `entry` to the manifest's phase_7_export.exports, replacing an earlier export to the same directory."""
    manifest = Manifest(run_dir)
    earlier = [e for e in manifest.phases.get(EXPORT_PHASE, {}).get("exports", []) if e.get("out") != entry["out"]]
    manifest.phases[EXPORT_PHASE] = {"status": "completed", "started_at": entry["started_at"],
                                     "wall_s": entry["wall_s"], "exports": [*earlier, entry]}
    manifest.write()
