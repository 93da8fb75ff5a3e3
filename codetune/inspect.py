"""`codetune inspect REPO`: what a run would train on, per language, and which config fits.

It runs the same scan as training (ignore rules, filters, secret redaction; see
`codetune.data.files`), counts tokens with a tokenizer, and prints a rich table of files, lines and
tokens per language, the skipped files by reason with examples (`codetune_output`: run
directories and other outputs of codetune, never trained on), the secrets replaced per kind with
where they were (`path:line`, the first few and how many more), and the recommended config
(`codetune.data.languages`). `--json` prints the same as one JSON object with a
`recommended_config` key; `secret_locations` lists up to 20 places per kind, `secrets_redacted`
counts them all. No model weights are loaded and nothing runs on a GPU.

Tokens: `--tokenizer tiny` (the default, offline) trains the embedded default's byte-level BPE on the
kept files, as `fit` does with the training files; a local model directory or a cached hub id
(`Qwen/Qwen2.5-Coder-1.5B`) counts with that model's tokenizer; `none` skips token counting for the
fastest answer. Token ids go through the same on-disk cache as training (`--cache_dir`), so a
second look at an unchanged repository re-tokenizes nothing. With a tokenizer, the report also says
what `fit`'s fill-in-the-middle would make of the training split at `--seq_len` and `--fim_rate`
(the same pieces and draws, `codetune.data.fim`): pieces, FIM samples, PSM and SPM.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from codetune.data.files import (DEFAULT_EXTENSIONS, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH, ScanResult,
                                 scan_argument_problems, scan_repository)
from codetune.data.split import DEFAULT_VAL_FRACTION, split_paths
from codetune.data.languages import RUST_CONFIG, language_table, recommend_config
from codetune.errors import ConfigError, exit_status

NO_TOKENIZER = "none"
EXAMPLES_PER_REASON = 3
SECRET_LOCATIONS_SHOWN = 3  # per kind in the table
SECRET_LOCATIONS_JSON = 20  # per kind in --json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune inspect",
        description="Show what codetune would train on in a repository, and which config fits it.",
    )
    parser.add_argument("repo", help="The repository's root directory.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    parser.add_argument("--tokenizer", default="tiny",
                        help="Tokenizer for the token counts: 'tiny' (trained on the repo, offline), a local "
                             "model directory or cached hub id, or 'none' to skip counting. Default: tiny.")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS), metavar="EXT",
                        help="File extensions to consider, as --data.extensions in training.")
    parser.add_argument("--ignore_patterns", nargs="*", default=[], metavar="PATTERN",
                        help="Extra gitignore-style patterns, as --data.ignore_patterns in training.")
    parser.add_argument("--max_file_bytes", type=int, default=DEFAULT_MAX_FILE_BYTES, help="As --data.max_file_bytes.")
    parser.add_argument("--max_line_length", type=int, default=DEFAULT_MAX_LINE_LENGTH,
                        help="As --data.max_line_length.")
    parser.add_argument("--cache_dir", default="~/.cache/codetune",
                        help="Token cache, shared with training ('none' disables it).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow a hub tokenizer's custom code.")
    parser.add_argument("--seq_len", type=int, default=2048,
                        help="Window length for the fill-in-the-middle plan, as --data.seq_len (default: 2048).")
    parser.add_argument("--fim_rate", type=float, default=None,
                        help="As --data.fim_rate: the share of training pieces made FIM samples (default: 0.5 when "
                             "the tokenizer has FIM tokens, else 0, as fit).")
    return parser


def run(argv: Sequence[str]) -> int:
    """`codetune inspect ...` from either entry point: bad input is one line on stderr and status 2."""
    return exit_status(lambda: main(argv), "codetune inspect")


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    report = inspect_repository(
        Path(args.repo), args.extensions, args.ignore_patterns, args.max_file_bytes, args.max_line_length,
        args.tokenizer, None if args.cache_dir == NO_TOKENIZER else args.cache_dir, args.trust_remote_code,
        args.seq_len, args.fim_rate,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, Console())
    return 0


def inspect_repository(repo: Path, extensions: Sequence[str], ignore_patterns: Sequence[str], max_file_bytes: int,
                       max_line_length: int, tokenizer: str, cache_dir: str | None,
                       trust_remote_code: bool = False, seq_len: int = 2048,
                       fim_rate: float | None = None) -> dict[str, Any]:
    """The inspection report of `repo` as a JSON-ready dict (see `print_report` for its parts)."""
    problems = scan_argument_problems(extensions, ignore_patterns, max_file_bytes, max_line_length)
    if seq_len < 2:
        problems.append(f"seq_len={seq_len}: a window needs at least 2 tokens")
    if fim_rate is not None and not 0 <= fim_rate <= 1:
        problems.append(f"fim_rate={fim_rate}: use a share in [0, 1], e.g. 0.5")
    if problems:
        raise ConfigError("; ".join(f"--{p}" for p in problems))
    if not repo.expanduser().is_dir():
        what = "is not a directory" if repo.expanduser().exists() else "does not exist"
        raise ConfigError(f"REPO {str(repo)!r} {what}. Give the path of your repository's root directory.")
    started = time.perf_counter()
    scan = scan_repository(repo.expanduser(), extensions, ignore_patterns, max_file_bytes, max_line_length)
    scan_s = time.perf_counter() - started
    started = time.perf_counter()
    counted = _count_tokens(scan, tokenizer, cache_dir, trust_remote_code)
    token_counts, cache = (None, None) if counted is None else ([len(x) for x in counted.ids], counted.cache)
    fim = None if counted is None else _fim_plan(scan, counted, seq_len, fim_rate)
    tokenize_s = time.perf_counter() - started
    rows = language_table(scan.files, token_counts)
    advice = recommend_config(rows)
    return {
        "repo": str(repo.expanduser().resolve()),
        "tokenizer": tokenizer,
        "languages": [r.as_dict() for r in rows],
        "totals": {
            "files": len(scan.files),
            "lines": sum(r.lines for r in rows),
            "bytes": sum(r.bytes for r in rows),
            "tokens": None if token_counts is None else int(sum(token_counts)),
        },
        "files_skipped": scan.skip_counts(),
        "skipped_examples": _skipped_examples(scan),
        "secrets_redacted": dict(scan.secrets_redacted),
        "secret_locations": scan.secret_locations(SECRET_LOCATIONS_JSON),
        "rust_share_of_code_lines": round(advice.rust_share, 4),
        "recommended_config": advice.config,
        "recommendation_reason": advice.reason,
        "token_cache": cache,
        "fim": fim,
        "wall_s": {"scan": round(scan_s, 3), "tokenize": round(tokenize_s, 3)},
    }


@dataclass(frozen=True)
class Counted:
    """The tokenizer, the ids of every kept file (scan order) and the token cache's hits and misses."""

    tokenizer: Any
    ids: list[Any]
    cache: dict[str, Any]


def _count_tokens(scan: ScanResult, tokenizer: str, cache_dir: str | None, trust_remote_code: bool) -> Counted | None:
    """Every kept file's ids under `tokenizer` (None: not counted)."""
    if tokenizer == NO_TOKENIZER or not scan.files:
        return None
    # Imported here: transformers costs seconds to import, and `--tokenizer none` needs none of it.
    from codetune.data.tokens import load_tokenizer, tokenize_cached

    texts = [f.text for f in scan.files]
    # 'tiny' learns its vocabulary from the training files of fit's default split, as fit does: the same
    # tokenizer, so these counts are training's and the cache entries written here are the ones fit reads.
    train_paths, _ = split_paths([f.rel_path for f in scan.files], DEFAULT_VAL_FRACTION)
    by_path = {f.rel_path: f.text for f in scan.files}
    loaded = load_tokenizer(tokenizer, [by_path[p] for p in train_paths], trust_remote_code, flag="--tokenizer")
    ids, stats = tokenize_cached(loaded, texts, cache_dir)
    return Counted(loaded, ids, {"hits": stats.hits, "misses": stats.misses, "dir": stats.directory})


def _fim_plan(scan: ScanResult, counted: Counted, seq_len: int, fim_rate: float | None) -> dict[str, Any]:
    """What fit's fill-in-the-middle would make of the training split: the same samples (seed 0)."""
    from codetune.data.fim import DEFAULT_FIM_RATE, NewlineTable, find_fim_tokens, training_samples

    tokens = find_fim_tokens(counted.tokenizer)
    if tokens is None and fim_rate:
        raise ConfigError(f"--fim_rate {fim_rate}: the tokenizer has no fill-in-the-middle tokens, so fit would refuse "
                          f"it; leave --fim_rate out (fit then trains left-to-right).")
    rate = (DEFAULT_FIM_RATE if fim_rate is None else fim_rate) if tokens is not None else 0.0
    train_paths, _ = split_paths([f.rel_path for f in scan.files], DEFAULT_VAL_FRACTION)
    by_path = {f.rel_path: ids for f, ids in zip(scan.files, counted.ids)}
    samples = training_samples(train_paths, [by_path[p] for p in train_paths], counted.tokenizer.eos_token_id,
                               seq_len, 0, rate, 0.5, tokens,
                               NewlineTable.of(counted.tokenizer, counted.cache["dir"]) if rate else None)
    return {"tokens": tokens.names() if tokens else None, "rate": rate, "spm_rate": 0.5, "seq_len": seq_len,
            **samples.counts()}


def _skipped_examples(scan: ScanResult) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for skipped in scan.skipped:
        paths = examples.setdefault(skipped.reason, [])
        if len(paths) < EXAMPLES_PER_REASON:
            paths.append(skipped.rel_path)
    return dict(sorted(examples.items()))


def print_report(report: dict[str, Any], console: Console) -> None:
    """Languages table, skipped table, secrets and the recommendation."""
    console.print(_language_table(report))
    if report["files_skipped"]:
        console.print(_skipped_table(report))
    if report["secrets_redacted"]:
        console.print(_secrets_table(report))
    if report["fim"] is not None:
        console.print(_fim_line(report), soft_wrap=True)
    # soft_wrap: a command wrapped at the terminal width could not be pasted.
    console.print(f"Recommended config: [bold]{report['recommended_config']}[/bold] "
                  f"({report['recommendation_reason']})", soft_wrap=True)
    repo = Path(report["repo"]).resolve()
    console.print(f"  codetune fit --config {report['recommended_config']} --data.repo {repo}",
                  soft_wrap=True, highlight=False)
    target = "train-rust" if report["recommended_config"] == RUST_CONFIG else "train"
    console.print(f"  make {target} REPO={repo}   (from the codetune checkout)", soft_wrap=True, highlight=False)


def _fim_line(report: dict[str, Any]) -> str:
    fim = report["fim"]
    if fim["tokens"] is None:
        return (f"Fill-in-the-middle: tokenizer {report['tokenizer']!r} has no FIM tokens, so fit trains "
                f"left-to-right only.")
    return (f"Fill-in-the-middle: tokenizer {report['tokenizer']!r} has {fim['tokens']['family']}'s sentinels; at "
            f"--data.fim_rate {fim['rate']} and {fim['seq_len']:,}-token windows, {fim['fim']:,} of {fim['pieces']:,} "
            f"training pieces become FIM samples ({fim['psm']:,} PSM, {fim['spm']:,} SPM).")


def _language_table(report: dict[str, Any]) -> Table:
    counted = report["totals"]["tokens"] is not None
    table = Table(title=f"{report['repo']}: kept files per language", title_justify="left")
    for name in ("language", "files", "lines", "tokens" if counted else None, "share of code lines"):
        if name:
            table.add_column(name, justify="left" if name == "language" else "right")
    code_lines = sum(r["lines"] for r in report["languages"] if r["is_code"])
    for r in report["languages"]:
        share = f"{r['lines'] / code_lines:.1%}" if r["is_code"] and code_lines else "(not code)"
        tokens = [f"{r['tokens']:,}"] if counted else []
        table.add_row(r["language"], f"{r['files']:,}", f"{r['lines']:,}", *tokens, share)
    totals = report["totals"]
    tokens = [f"{totals['tokens']:,}"] if counted else []
    table.add_row("[bold]total[/bold]", f"{totals['files']:,}", f"{totals['lines']:,}", *tokens, "", end_section=True)
    if counted:
        table.caption = f"tokens under tokenizer {report['tokenizer']!r}"
    return table


def _skipped_table(report: dict[str, Any]) -> Table:
    table = Table(title="Skipped (directories end in /)", title_justify="left")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("examples")
    for reason, n in report["files_skipped"].items():
        table.add_row(reason, f"{n:,}", ", ".join(report["skipped_examples"].get(reason, [])))
    return table


def _secrets_table(report: dict[str, Any]) -> Table:
    table = Table(title="Secrets replaced by a placeholder in kept files",
                  title_justify="left")
    table.add_column("kind")
    table.add_column("count", justify="right")
    table.add_column("where (path:line)")
    for kind, n in report["secrets_redacted"].items():
        table.add_row(kind, f"{n:,}", _places(report["secret_locations"].get(kind, []), n))
    return table


def _places(locations: list[str], total: int) -> str:
    """The first locations of a kind, and how many more there are."""
    shown = locations[:SECRET_LOCATIONS_SHOWN]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more else "")
