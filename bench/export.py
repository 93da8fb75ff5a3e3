"""How long `codetune export` takes, as a user runs it: one fresh process per run and target.

    python bench/export.py runs/<demo run> [runs/<another run> ...] [--outtype f16]

Each export writes to a temporary directory (the runs' manifests still record it). Prints one row per run and
target: wall seconds of the whole command (interpreter start and imports included), what it wrote, or the
first words of its refusal. The goal: under 10 s each on CPU for the demo run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("gguf", "ollama", "vllm")


def export_once(run: Path, target: str, out: Path, outtype: str) -> tuple[float, int, str]:
    """(wall seconds, exit status, what it wrote or why it refused)."""
    args = [sys.executable, "-m", "codetune", "export", str(run), "--to", target, "--out", str(out)]
    if target != "vllm":
        args += ["--outtype", outtype]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return wall, done.returncode, done.stderr.strip().splitlines()[-1][:110]
    files = json.loads((out / "codetune_export.json").read_text())["files"]
    return wall, 0, ", ".join(f"{f['file']} {f['bytes'] / 1024:.0f} KiB" for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16", "q8_0"))
    args = parser.parse_args()
    print(f"# codetune export, {datetime.date.today()}, {os.cpu_count()} CPU cores, --outtype {args.outtype}\n")
    print("| run | target | wall s | status | wrote / refusal |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            for target in TARGETS:
                wall, status, what = export_once(run, target, Path(tmp) / f"{run.name}-{target}", args.outtype)
                print(f"| {run.name} | {target} | {wall:.2f} | {status} | {what} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
