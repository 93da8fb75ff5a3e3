"""What bounding the validation costs and saves: a short fit on a large repository, validating every held-out window
and then --data.max_val_windows of them (the default), with the time in training (steps and validation) and the
held-out loss of each.

    python bench/final_validation.py [--repo /usr/lib/python3/dist-packages] [--steps 3]

Both fits train the same steps on the same windows (same seed), so their final validation losses differ only by
which windows they measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ("--config", "default", "--config", "demo", "--generation.base_eval", "false", "--generation.repo_prompts",
         "0", "--generation.fim_prompts", "0", "--generation.prompts", "[]", "--trainer.enable_progress_bar", "false",
         "--checkpoint_every_n_steps", "0")


def fit(repo: Path, runs: Path, name: str, steps: int, max_val_windows: str, cache: Path) -> dict:
    """One fit; its figures from the manifest and the wall clock."""
    cmd = [sys.executable, "-m", "codetune", "fit", *FLAGS, "--data.repo", str(repo), "--runs_dir", str(runs),
           "--run_name", name, "--trainer.max_steps", str(steps), "--data.max_val_windows", max_val_windows,
           "--data.cache_dir", str(cache)]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: the fit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    manifest = json.loads((runs / name / "MANIFEST.json").read_text())
    phases = manifest["phase_results"]
    tokenize, training = phases["phase_2_tokenize"], phases["phase_4_training"]
    return {"max_val_windows": max_val_windows, "held_out_windows": tokenize["val_windows"],
            "validated_windows": tokenize["val_windows_used"], "training_s": training["wall_s"],
            "final_val_loss": training["training_stats"]["final_val_loss"], "fit_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("/usr/lib/python3/dist-packages"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs, cache = Path(tmp) / "runs", Path(tmp) / "cache"
        rows = [fit(args.repo, runs, name, args.steps, limit, cache) for name, limit in (("all", "null"),
                                                                                          ("bounded", "256"))]
    print(f"{'max_val_windows':>16} {'held-out':>9} {'validated':>10} {'training s':>11} {'val loss':>9} {'fit s':>7}")
    for row in rows:
        print(f"{row['max_val_windows']:>16} {row['held_out_windows']:>9} {row['validated_windows']:>10} "
              f"{row['training_s']:>11.1f} {row['final_val_loss']:>9.4f} {row['fit_wall_s']:>7.1f}")
    print(f"training time bounded / all: {rows[1]['training_s'] / rows[0]['training_s']:.3f}; "
          f"val loss difference: {rows[1]['final_val_loss'] - rows[0]['final_val_loss']:+.4f}")


if __name__ == "__main__":
    main()
