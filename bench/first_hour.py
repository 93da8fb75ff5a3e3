"""The first hour of a new user: how long commands take to start, and what the demo and a short fit cost.

Run from the repository root::

    python bench/first_hour.py                 # start-up times, the demo, a 3-step fit of the default config
    python bench/first_hour.py --skip-demo     # start-up times and the short fit only
    python bench/first_hour.py --rounds 5      # more start-up rounds (the median is reported)
    python bench/first_hour.py --skip-fit --demo-seeds 0 1 2   # the demo over three seeds, and its spread

Why: the demo is the first thing a user runs and a short fit the second; neither should spend its time
anywhere but training, and no command should keep them waiting before it answers.

1. **start-up**: the wall time of ``codetune --help``, ``codetune inspect --help`` and
   ``codetune fit --help`` as subprocesses (the median of ``--rounds``). Goals: under 1 s, 1 s, 5 s.
2. **demo**: ``codetune fit --config configs/training_config.yaml --config configs/presets/demo.yaml
   --data.repo .`` (``make demo`` without the install check) into a temporary ``--runs_dir``: the
   process's wall time, the manifest's phase wall times, its ``training_time_minutes``, the evaluation's
   ``eval_seconds`` and its learning figures (final train loss, held-out perplexity, next-line exact match,
   completion chrF and FIM line exact match, base -> tuned, with the prompt counts they rest on). Goals:
   wall under 150 s, evaluation at most 15% of it, the three completion figures rising. ``--demo-seeds 0 1 2``
   runs it once per seed and prints the spread of each change.
3. **short fit**: the default config (``configs/training_config.yaml``: 2048-token windows, 8 x 2, 16 repo
   prompts and 4 language prompts at up to 256 tokens) with the tiny model on CPU for 3 optimizer steps,
   on this repository: wall time, training time and evaluation seconds. This is the first fit a user
   makes to see that everything works, and where an unbounded evaluation would cost the most.

Every figure comes from one invocation, so ratios compare like with like. The ``load`` column is the
1-minute load average after each step; above the core count, another process shared the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO = ["--config", "configs/training_config.yaml", "--config", "configs/presets/demo.yaml", "--data.repo", "."]
SHORT_FIT = ["--config", "configs/training_config.yaml", "--model.name_or_path", "tiny",
             "--model.quantization", "none", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
             "--data.repo", "."]
STARTUP = {"codetune --help": ["--help"], "codetune inspect --help": ["inspect", "--help"],
           "codetune fit --help": ["fit", "--help"]}
STARTUP_GOAL_S = {"codetune --help": 1.0, "codetune inspect --help": 1.0, "codetune fit --help": 5.0}
DEMO_GOAL_S = 150.0
COMPLETION = ("next_line_exact_match", "chrf", "fim_exact_match")
EVAL_SHARE_GOAL = 0.15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Start-up rounds per command (median reported).")
    parser.add_argument("--skip-demo", action="store_true", help="Do not run the demo.")
    parser.add_argument("--skip-fit", action="store_true", help="Do not run the short fit.")
    parser.add_argument("--json", type=Path, help="Also write every figure to this JSON file.")
    parser.add_argument("--runs-dir", type=Path, help="Keep the runs in this directory (default: a temporary one).")
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[42], metavar="SEED",
                        help="Run the demo once per --seed_everything value (default: the config's 42); with more "
                             "than one, the spread of its completion figures over the seeds is printed.")
    args = parser.parse_args(argv)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}")
    figures: dict[str, Any] = {"startup": startup_times(args.rounds)}
    print_startup(figures["startup"])
    with tempfile.TemporaryDirectory(prefix="codetune-first-hour-") as temporary:
        runs = args.runs_dir or temporary
        if not args.skip_demo:
            demos = [timed_fit(f"demo-seed{seed}", [*DEMO, "--seed_everything", str(seed)], Path(runs))
                     for seed in args.demo_seeds]
            for demo in demos:
                print_fit(demo, goal_s=DEMO_GOAL_S)
            print_spread(demos)
            figures["demo"] = demos
        if not args.skip_fit:
            figures["short_fit"] = timed_fit("short-fit", SHORT_FIT, Path(runs))
            print_fit(figures["short_fit"], goal_s=None)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def codetune(*args: str) -> list[str]:
    return [sys.executable, "-m", "codetune", *args]


def startup_times(rounds: int) -> dict[str, dict[str, float]]:
    """The median and all wall times of each start-up command."""
    times: dict[str, list[float]] = {name: [] for name in STARTUP}
    for _ in range(rounds):  # interleaved, so a busy moment slows every command alike
        for name, args in STARTUP.items():
            started = time.perf_counter()
            subprocess.run(codetune(*args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(t), "runs_s": t, "load": os.getloadavg()[0]}
            for name, t in times.items()}


def timed_fit(name: str, args: list[str], runs: Path) -> dict[str, Any]:
    """Runs one `codetune fit` to completion; its wall time and what its manifest says."""
    started = time.perf_counter()
    done = subprocess.run(codetune("fit", *args, "--runs_dir", str(runs), "--run_name", name),
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"first_hour: {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((runs / name / "MANIFEST.json").read_text())
    phases = manifest["phase_results"]
    evaluation = phases.get("phase_5_evaluation", {})
    stats = phases["phase_4_training"]["training_stats"]
    return {
        "name": name, "command": "codetune fit " + " ".join(args), "wall_s": wall, "load": os.getloadavg()[0],
        "phase_wall_s": {phase: p.get("wall_s") for phase, p in phases.items()},
        "training_s": manifest["training_time_minutes"] * 60, "eval_s": evaluation.get("eval_seconds", 0.0),
        "steps": stats.get("optimizer_steps"), "final_train_loss": stats.get("final_train_loss"),
        "perplexity_base": (evaluation.get("base") or {}).get("perplexity"),
        "perplexity_final": (evaluation.get("final") or {}).get("perplexity"),
        "eval_budget_hit": evaluation.get("budget_hit"),
        "prompts": {"repo": evaluation.get("repo_prompts_scored"), "fim": evaluation.get("fim_prompts_scored")},
        "completion": {key: [(evaluation.get(stage) or {}).get(key) for stage in ("base", "final")]
                       for key in COMPLETION},
    }


def print_startup(startup: dict[str, dict[str, float]]) -> None:
    print(f"\n{'start-up':28} {'median':>8} {'goal':>6}  runs")
    for name, t in startup.items():
        goal = STARTUP_GOAL_S[name]
        runs = " ".join(f"{s:.2f}" for s in t["runs_s"])
        mark = "ok" if t["median_s"] < goal else "OVER"
        print(f"{name:28} {t['median_s']:7.2f}s {goal:5.1f}s  {runs}  {mark}  (load {t['load']:.1f})")


def print_fit(fit: dict[str, Any], goal_s: float | None) -> None:
    share = fit["eval_s"] / fit["wall_s"]
    print(f"\n{fit['name']}: {fit['command']}")
    print(f"  wall {fit['wall_s']:.1f} s" + (f" (goal < {goal_s:.0f} s: {'ok' if fit['wall_s'] < goal_s else 'OVER'})"
                                              if goal_s else "") + f", load {fit['load']:.1f}")
    goal = (f" (goal <= {EVAL_SHARE_GOAL:.0%}: {'ok' if share <= EVAL_SHARE_GOAL else 'OVER'})" if goal_s else "")
    print(f"  training {fit['training_s']:.1f} s ({fit['steps']} steps), evaluation {fit['eval_s']:.1f} s = "
          f"{share:.1%} of the wall time{goal}"
          + (f", budget hit: {fit['eval_budget_hit']}" if fit["eval_budget_hit"] else ""))
    print("  phases: " + ", ".join(f"{p.removeprefix('phase_')} {s:.1f} s" for p, s in fit["phase_wall_s"].items()
                                   if s is not None))
    ppl = (f"{fit['perplexity_base']:,.0f} -> {fit['perplexity_final']:,.1f}"
           if fit["perplexity_base"] and fit["perplexity_final"] else "—")
    print(f"  final train loss {fit['final_train_loss']:.3f}, held-out perplexity {ppl}")
    figures = ", ".join(f"{key} {_figure(base)} -> {_figure(final)}"
                        for key, (base, final) in fit["completion"].items())
    print(f"  {figures} (prompts: {fit['prompts']})")


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def print_spread(fits: list[dict[str, Any]]) -> None:
    """Each completion figure's change base -> tuned over the seeds: min, mean and max."""
    if len(fits) < 2:
        return
    print(f"\nover {len(fits)} seeds, tuned - base:")
    for key in COMPLETION:
        changes = [f["completion"][key][1] - f["completion"][key][0] for f in fits
                   if None not in f["completion"][key]]
        if changes:
            print(f"  {key:24} min {min(changes):+.3f}  mean {statistics.mean(changes):+.3f}  max {max(changes):+.3f}"
                  f"  (rose in {sum(c > 0 for c in changes)} of {len(changes)})")


if __name__ == "__main__":
    sys.exit(main())
