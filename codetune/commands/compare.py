"""`codetune compare RUN_OR_MANIFEST...`: two or more runs side by side, from their manifests alone.

Each argument is a run directory (its MANIFEST.json is read) or a manifest file of any name
(`MANIFEST_RUST.json`). The first run is the baseline: every later run shows its value and, in
parentheses, its change against the baseline, green where the change is an improvement and red
where it is not. Which direction is better is fixed per row: losses, perplexity, training time and
peak VRAM are better lower; exact match, chrF and syntax validity better higher; counts (steps,
tokens, windows, parameters) are neither, only different. A second table lists the config keys
(the resolved CLI config the manifest records, flattened to `model.lora_rank`) whose values differ.

Nothing is trained, loaded or imported beyond the standard library and rich: it answers in well
under a second. A value a manifest does not have (an older run, a run that failed, no GPU for the
VRAM peak) is shown as "—"; rows that no run has are left out of the table, while `--json` always
holds every row (null where missing; a non-finite number, e.g. a NaN loss, is null there too).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from codetune.errors import ConfigError, exit_status
from codetune.eval.report import (EVAL_METRICS, LOWER, MISSING, RATE_METRICS, delta, format_change, format_value,
                                  verdict)
from codetune.storage import MANIFEST_NAME
from codetune.run.directory import live_status

# The CLI derives these from --run_name and --runs_dir (see CodetuneCLI.before_instantiate_classes):
# they differ between any two runs by construction and say where a run wrote, not how it trained.
IGNORED_CONFIG_KEYS = ("run_name", "runs_dir", "trainer.default_root_dir", "checkpoint.dirpath",
                       "trainer.logger.init_args.save_dir")
# phase_5_evaluation keys and how the table names them; tuned - base is better in the metric's direction.
EVAL_STAGES = (("base", "base"), ("final", "tuned"), ("delta", "tuned-base"))


@dataclass(frozen=True)
class Row:
    """One compared quantity: where it sits in a manifest and which direction is an improvement."""

    name: str
    label: str
    path: tuple[str, ...]
    section: str
    better: str | None = None
    count: bool = False  # the manifest holds a list; its length is compared


@dataclass(frozen=True)
class LoadedRun:
    """A manifest as read from one command-line argument."""

    argument: str
    path: Path
    data: dict[str, Any]


def _training(name: str, label: str, better: str | None = None) -> Row:
    return Row(name, label, ("phase_results", "phase_4_training", "training_stats", name), "training", better)


ROWS = (
    Row("status", "status", ("status",), "run"),
    Row("failed_phase", "failed phase", ("failed_phase",), "run"),
    Row("segments", "training segments", ("segments",), "run", count=True),
    _training("final_train_loss", "final train loss", LOWER),
    _training("final_val_loss", "final val loss", LOWER),
    _training("final_perplexity", "final perplexity", LOWER),
    _training("optimizer_steps", "optimizer steps"),
    _training("epochs", "epochs"),
    _training("tokens_trained", "tokens trained"),
    Row("training_time_minutes", "training time (min)", ("training_time_minutes",), "training", LOWER),
    Row("peak_vram_gb", "peak VRAM (GB)", ("phase_results", "phase_4_training", "peak_vram_gb"), "training", LOWER),
    Row("trainable_parameters", "trainable parameters",
        ("phase_results", "phase_3_model", "trainable_parameters"), "training"),
    Row("train_tokens", "train tokens", ("phase_results", "phase_2_tokenize", "train_tokens"), "data"),
    Row("train_windows", "train windows", ("phase_results", "phase_2_tokenize", "train_windows"), "data"),
    *(Row(f"eval_{stage}_{key}", f"{label}, {stage_label}", ("phase_results", "phase_5_evaluation", stage, key),
          "evaluation", better)
      for key, label, better in EVAL_METRICS for stage, stage_label in EVAL_STAGES),
)


# -- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune compare",
        description="Compare two or more runs: final losses, perplexity, time, tokens, VRAM and the "
                    "before/after evaluation, each later run against the first, and the config keys "
                    "that differ. Reads the manifests only.",
        epilog="Example: codetune compare runs/python runs/rust/MANIFEST_RUST.json",
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_OR_MANIFEST",
                        help="A run directory (holding MANIFEST.json) or a manifest file; the first is the baseline.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    return parser


def run(argv: Sequence[str]) -> int:
    """`codetune compare ...` from either entry point: bad input is one line on stderr and status 2."""
    return exit_status(lambda: main(argv), "codetune compare")


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    report = compare_runs(load_runs(args.runs))
    if args.json:
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False))
        return 0
    console = Console()
    if not console.is_terminal:
        # Redirected, rich assumes 80 columns and folds every cell; a table saved to a file or pasted
        # into a report should keep its rows whole (a table is only as wide as its contents).
        console = Console(width=max(console.width, 160))
    print_comparison(report, console)
    return 0


# -- loading ---------------------------------------------------------------------------------------

def load_runs(arguments: Sequence[str]) -> list[LoadedRun]:
    """Every argument's manifest; all unreadable ones are reported together in one ConfigError."""
    if len(arguments) < 2:
        raise ConfigError(f"give two or more runs to compare (got {len(arguments)}), e.g. "
                          f"`codetune compare runs/a runs/b` or a run directory and a manifest file.")
    loaded, problems = [], []
    for argument in arguments:
        try:
            loaded.append(load_manifest(argument))
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(p.removesuffix(".") for p in problems) + ".")
    return loaded


def load_manifest(argument: str) -> LoadedRun:
    """The manifest that `argument` names: a run directory's MANIFEST.json, or the file itself."""
    path = manifest_path(argument)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"RUN {argument!r}: {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                          f"{err.colno}); give a manifest written by `codetune fit`.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"RUN {argument!r}: {path} is not UTF-8 text; give a manifest written by "
                          f"`codetune fit`.") from None
    except OSError as err:
        raise ConfigError(f"RUN {argument!r}: {path} cannot be read ({err.strerror or err}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"RUN {argument!r}: {path} holds a JSON {type(data).__name__}, not a run manifest "
                          f"(a JSON object with phase_results); give a manifest written by `codetune fit`.")
    # A manifest left `running` by a process that is gone (kill -9, a power cut) says so.
    data["status"] = live_status(path.parent, data)
    return LoadedRun(argument, path, data)


def manifest_path(argument: str) -> Path:
    path = Path(argument).expanduser()
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise ConfigError(f"RUN {argument!r} is a directory without {MANIFEST_NAME}; give a run directory "
                              f"(runs/<name>) or the path of a manifest file.")
        return path / MANIFEST_NAME
    if not path.exists():
        raise ConfigError(f"RUN {argument!r} does not exist; give a run directory (runs/<name>) or the path of "
                          f"a manifest file.")
    return path


# -- the comparison (pure) -------------------------------------------------------------------------

def compare_runs(runs: Sequence[LoadedRun]) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: runs, one entry per metric row, config differences."""
    labels = run_labels(runs)
    manifests = [r.data for r in runs]
    configs = [m.get("config") if isinstance(m.get("config"), dict) else None for m in manifests]
    return {
        "baseline": labels[0],
        "runs": [{"label": label, "manifest": str(r.path), "run_name": r.data.get("run_name"),
                  "status": r.data.get("status")} for label, r in zip(labels, runs)],
        "metrics": [metric_row(row, manifests) for row in ROWS],
        "config_diff": config_diff(configs),
        "config_missing": [label for label, config in zip(labels, configs) if config is None],
        "config_ignored": list(IGNORED_CONFIG_KEYS),
    }


def run_labels(runs: Sequence[LoadedRun]) -> list[str]:
    """run_name, else the file's name (its directory's for MANIFEST.json); a clash adds the file name,
    and a clash after that takes the argument as given."""
    labels = [_own_label(r) for r in runs]
    labels = [f"{label} ({r.path.name})" if labels.count(label) > 1 else label for label, r in zip(labels, runs)]
    return [r.argument if labels.count(label) > 1 else label for label, r in zip(labels, runs)]


def _own_label(run: LoadedRun) -> str:
    name = run.data.get("run_name")
    if isinstance(name, str) and name:
        return name
    return run.path.parent.resolve().name if run.path.name == MANIFEST_NAME else run.path.name


def metric_row(row: Row, manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Values of `row` in every manifest, and each one's change against the first and its verdict."""
    values = [metric_value(m, row) for m in manifests]
    deltas = [None] + [delta(v, values[0]) for v in values[1:]]
    return {"name": row.name, "label": row.label, "source": ".".join(row.path), "better": row.better,
            "values": values, "deltas": deltas, "verdicts": [verdict(d, row.better) for d in deltas]}


def metric_value(manifest: Mapping[str, Any], row: Row) -> Any:
    """The scalar at `row.path` (a list's length for a count row); None when absent or not a scalar."""
    value: Any = manifest
    for key in row.path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    if row.count:
        return len(value) if isinstance(value, list) else None
    return value if isinstance(value, (str, int, float)) else None


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`model.lora_rank`); lists and empty dicts stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_diff(configs: Sequence[Mapping[str, Any] | None],
                ignored: Sequence[str] = IGNORED_CONFIG_KEYS) -> list[dict[str, Any]]:
    """Dotted keys whose values are not all equal across the runs that recorded a config.

    Each entry: `key`, `values` (one per run, None where the run has no config or not that key) and
    `missing` (indices of the runs without the key, whose None is not a null in their config).
    """
    flats = [None if c is None else flatten_config(c) for c in configs]
    recorded = [f for f in flats if f is not None]
    keys = [k for k in dict.fromkeys(k for f in recorded for k in f) if k not in ignored]
    diff = []
    for key in keys:
        # Canonical JSON: 1, 1.0 and true are different settings, and lists compare element-wise.
        seen = {json.dumps(f[key], sort_keys=True, default=str) if key in f else None for f in recorded}
        if len(seen) > 1:
            diff.append({"key": key, "values": [None if f is None else f.get(key) for f in flats],
                         "missing": [i for i, f in enumerate(flats) if f is None or key not in f]})
    return diff


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# -- printing --------------------------------------------------------------------------------------

def print_comparison(report: dict[str, Any], console: Console) -> None:
    """The metrics table, then the config differences (or a line saying there are none)."""
    console.print(metrics_table(report))
    if report["config_missing"]:
        console.print(f"No config recorded in: {', '.join(report['config_missing'])}", highlight=False)
    if report["config_diff"]:
        console.print(config_table(report))
    else:
        console.print("Configs: no differences.")
    console.print(f"Not compared (where a run wrote, not how it trained): "
                  f"{', '.join(report['config_ignored'])}", style="dim", highlight=False)


def metrics_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Runs: value (change against {report['baseline']})", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for run_info in report["runs"]:
        table.add_column(Text(run_info["label"]), justify="right")
    rows = [r for r in report["metrics"] if any(v is not None for v in r["values"])]
    section_of = {row.name: row.section for row in ROWS}
    for i, row in enumerate(rows):
        last_of_section = i + 1 == len(rows) or section_of.get(rows[i + 1]["name"]) != section_of.get(row["name"])
        rate = _is_rate(row)
        cells = [_metric_cell(v, d, ver, rate) for v, d, ver in zip(row["values"], row["deltas"], row["verdicts"])]
        table.add_row(row["label"], *cells, end_section=last_of_section)
    return table


def config_table(report: dict[str, Any]) -> Table:
    table = Table(title="Config differences", title_justify="left")
    # fold, not ellipsis: a cut-off key or value would hide the very difference the table is for.
    table.add_column("config key", overflow="fold")
    for run_info in report["runs"]:
        table.add_column(Text(run_info["label"]), overflow="fold")
    for entry in report["config_diff"]:
        cells = [Text(MISSING if i in entry["missing"] else format_config_value(v))
                 for i, v in enumerate(entry["values"])]
        table.add_row(Text(entry["key"]), *cells)
    return table


def _metric_cell(value: Any, change: int | float | None, verdict_: str | None, rate: bool) -> Text:
    text = Text(format_value(value, rate=rate))
    if change is not None:
        style = {"better": "green", "worse": "red"}.get(verdict_ or "", "dim")
        text.append(" (")
        text.append(format_change(change, rate=rate), style=style)
        text.append(")")
    return text


def _is_rate(row: Mapping[str, Any]) -> bool:
    """Whether a metric row (of `compare_runs`) holds an eval rate: phase_5_evaluation.<stage>.<rate metric>."""
    path = row["source"].split(".")
    return path[:2] == ["phase_results", "phase_5_evaluation"] and path[-1] in RATE_METRICS


def format_config_value(value: Any) -> str:
    # JSON spelling for everything but plain strings: null, true, [4, 8] read the same as in a YAML config.
    return value if isinstance(value, str) else json.dumps(value, default=str)
