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
fastest answer. Token ids go through the same on-disk cache as training (`--cache_dir`, default
~/.cache/codetune; `--cache_dir none` keeps nothing), so a second look at an unchanged repository, and
`fit` on it, re-tokenize nothing. The cache costs 4 bytes a token: the report ends with its directory
(one per tokenizer), what it holds and what this look added (`token_cache.bytes`, `bytes_added`; with
`--json`, one line on stderr too when it grew). With a tokenizer, the report also says what `fit`'s
fill-in-the-middle would make of the training split at `--seq_len` and `--fim_rate` (the same pieces
and draws, `codetune.data.fim`): pieces, FIM samples, PSM and SPM.

Progress: while it scans, trains the 'tiny' tokenizer and tokenizes (in chunks of about
`TOKENIZE_CHUNK_BYTES`, so the count moves), a status line on stderr says which and how far, with the
time so far; it is erased when the report prints. When stderr is not a terminal nothing is drawn, so
logs and pipes get the report alone; stdout holds only the report (one JSON object with `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from codetune.data.files import (DEFAULT_EXTENSIONS, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH, ScanResult,
                                 scan_argument_problems, scan_repository)
from codetune.data.split import DEFAULT_VAL_FRACTION, split_paths
from codetune.data.languages import RUST_CONFIG, language_table, no_code_problem, recommend_config
from codetune.errors import ConfigError, exit_status

NO_TOKENIZER = "none"
EXAMPLES_PER_REASON = 3
SECRET_LOCATIONS_SHOWN = 3  # per kind in the table
SECRET_LOCATIONS_JSON = 20  # per kind in --json
# Texts tokenized per call: large enough that the tokenizer's threads share out each batch, small enough that the
# count on the status line moves every second or so on a large repository.
TOKENIZE_CHUNK_BYTES = 8 << 20
# The scan's status line is redrawn after this many files are read (a redraw costs more than reading a small file).
SCAN_STATUS_EVERY = 200
Status = Callable[[str], None]
"""Told what inspect is doing now, e.g. 'tokenizing: 1,200 / 45,000 files (9.1 / 310.0 MB)'."""


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
                        help="Token cache, shared with training, 4 bytes a token; the report says where it is and "
                             "what this look added. 'none' keeps no cache. Default: ~/.cache/codetune.")
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


def main(argv: Sequence[str], stderr: Console | None = None) -> int:
    """The command; `stderr` (default: a console on sys.stderr) gets the status line and, with --json, the cache
    line."""
    args = build_parser().parse_args(list(argv))
    stderr = stderr or Console(file=sys.stderr)
    with status_line(stderr) as status:
        report = inspect_repository(
            Path(args.repo), args.extensions, args.ignore_patterns, args.max_file_bytes, args.max_line_length,
            args.tokenizer, None if args.cache_dir == NO_TOKENIZER else args.cache_dir, args.trust_remote_code,
            args.seq_len, args.fim_rate, status,
        )
    if args.json:
        print(json.dumps(report, indent=2), flush=True)
        if report["token_cache"] and report["token_cache"]["bytes_added"]:
            stderr.print(f"codetune inspect: {_cache_line(report['token_cache'])}", soft_wrap=True, highlight=False)
    else:
        print_report(report, Console())
    return 0


@contextmanager
def status_line(console: Console) -> Iterator[Status]:
    """Within: a `Status` that shows its text on a transient line of `console` (spinner, text, time so far), erased
    on exit; on a console that is not a terminal, one that shows nothing."""
    if not console.is_terminal:
        yield _no_status
        return
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                        transient=True)
    task = progress.add_task("codetune inspect: starting", total=None)
    with progress:
        # Redrawn at once: steps are seconds apart, and a chunk's count should show as it starts.
        yield lambda text: progress.update(task, description=f"codetune inspect: {text}", refresh=True)


def _scan_progress(status: Status, repo: Path, done: int, total: int) -> None:
    """The scan's status: files read of the candidates the walk found (every SCAN_STATUS_EVERY, and the last)."""
    if done % SCAN_STATUS_EVERY == 0 or done == total:
        status(f"scanning {repo}: read {done} / {total} files")


def _no_status(text: str) -> None:
    """A `Status` that shows nothing."""


def inspect_repository(repo: Path, extensions: Sequence[str], ignore_patterns: Sequence[str], max_file_bytes: int,
                       max_line_length: int, tokenizer: str, cache_dir: str | None,
                       trust_remote_code: bool = False, seq_len: int = 2048,
                       fim_rate: float | None = None, status: Status = _no_status) -> dict[str, Any]:
    """The inspection report of `repo` as a JSON-ready dict (see `print_report` for its parts); `status` is told
    each step as it starts, and the tokenizing's progress."""
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
    status(f"scanning {repo}")
    scan = scan_repository(repo.expanduser(), extensions, ignore_patterns, max_file_bytes, max_line_length,
                           on_read=lambda done, total: _scan_progress(status, repo, done, total))
    scan_s = time.perf_counter() - started
    started = time.perf_counter()
    counted = _count_tokens(scan, tokenizer, cache_dir, trust_remote_code, status)
    token_counts = None if counted is None else [len(x) for x in counted.ids]
    fim = None if counted is None else _fim_plan(scan, counted, seq_len, fim_rate, status)
    cache = None if counted is None else _cache_report(counted)
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
        # What `codetune fit` would refuse this repository for (None: it has code to train on).
        "no_code": no_code_problem(scan.files),
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
    cache_bytes_before: int
    """What the cache's directory held before this look (`directory_bytes`)."""


def _count_tokens(scan: ScanResult, tokenizer: str, cache_dir: str | None, trust_remote_code: bool,
                  status: Status) -> Counted | None:
    """Every kept file's ids under `tokenizer` (None: not counted)."""
    if tokenizer == NO_TOKENIZER or not scan.files:
        return None
    # Imported here: transformers costs seconds to import, and `--tokenizer none` needs none of it.
    from codetune.data.tokens import TokenCache, load_tokenizer, tokenize_texts
    from codetune.data.tokenizer import TINY_NAME

    texts = [f.text for f in scan.files]
    # 'tiny' learns its vocabulary from the training files of fit's default split, as fit does: the same
    # tokenizer, so these counts are training's and the cache entries written here are the ones fit reads.
    train_paths, _ = split_paths([f.rel_path for f in scan.files], DEFAULT_VAL_FRACTION)
    by_path = {f.rel_path: f.text for f in scan.files}
    training = [by_path[p] for p in train_paths]
    status(f"training the 'tiny' tokenizer on {len(training):,} files ({_mb(sum(map(len, training)))})"
           if tokenizer == TINY_NAME else f"loading the tokenizer {tokenizer}")
    loaded = load_tokenizer(tokenizer, training, trust_remote_code, flag="--tokenizer")
    cache = TokenCache(cache_dir, loaded) if cache_dir is not None else None
    before = directory_bytes(cache.directory) if cache is not None else 0
    ids, hits, done, total_bytes, done_bytes = [], 0, 0, sum(map(len, texts)), 0
    for chunk in text_chunks(texts, TOKENIZE_CHUNK_BYTES):
        status(f"tokenizing: {done:,} / {len(texts):,} files ({_mb(done_bytes, total_bytes)})"
               f"{f', {hits:,} from the cache' if hits else ''}")
        if cache is None:
            ids += tokenize_texts(loaded, chunk)
        else:
            chunk_ids, stats = cache.tokenize(chunk)
            ids += chunk_ids
            hits += stats.hits
        done, done_bytes = done + len(chunk), done_bytes + sum(map(len, chunk))
    return Counted(loaded, ids, {"hits": hits, "misses": len(texts) - hits,
                                 "dir": str(cache.directory) if cache else None}, before)


def text_chunks(texts: Sequence[str], chunk_bytes: int) -> Iterator[Sequence[str]]:
    """`texts` in consecutive runs of about `chunk_bytes` characters (at least one text each), in order."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= chunk_bytes:
            yield texts[start:i + 1]
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:]


def directory_bytes(directory: Path) -> int:
    """The size of the files under `directory` (0 when it does not exist); links are not followed."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            total += directory_bytes(Path(entry.path))
        else:
            total += entry.stat(follow_symlinks=False).st_size
    return total


def _cache_report(counted: Counted) -> dict[str, Any]:
    """The token cache's hits, misses and directory, what it holds now (bytes) and what this look added."""
    after = directory_bytes(Path(counted.cache["dir"])) if counted.cache["dir"] is not None else 0
    return {**counted.cache, "bytes": after, "bytes_added": after - counted.cache_bytes_before}


def _fim_plan(scan: ScanResult, counted: Counted, seq_len: int, fim_rate: float | None,
              status: Status) -> dict[str, Any]:
    """What fit's fill-in-the-middle would make of the training split: the same samples (seed 0)."""
    from codetune.data.fim import DEFAULT_FIM_RATE, NewlineTable, find_fim_tokens, training_samples

    status("planning the fill-in-the-middle samples")

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
    if report["no_code"]:
        console.print(f"[bold red]No source code:[/] {report['no_code']}, so `codetune fit` refuses this "
                      f"repository. Point it at the source tree, or add your languages' extensions with "
                      f"--extensions.", soft_wrap=True, highlight=False)
    else:
        _print_recommendation(report, console)
    if report["token_cache"] is not None:
        console.print(f"Token cache: {_cache_line(report['token_cache'])}", soft_wrap=True, highlight=False)


def _print_recommendation(report: dict[str, Any], console: Console) -> None:
    """The config to train with and the command that does it."""
    # soft_wrap: a command wrapped at the terminal width could not be pasted.
    console.print(f"Recommended config: [bold]{report['recommended_config']}[/bold] "
                  f"({report['recommendation_reason']})", soft_wrap=True)
    repo = Path(report["repo"]).resolve()
    console.print(f"  codetune fit --config {report['recommended_config']} --data.repo {repo}",
                  soft_wrap=True, highlight=False)
    target = "train-rust" if report["recommended_config"] == RUST_CONFIG else "train"
    console.print(f"  make {target} REPO={repo}   (from the codetune checkout)", soft_wrap=True, highlight=False)


def _cache_line(cache: dict[str, Any]) -> str:
    """Where the token ids went and how much room they take, or that none were kept."""
    if cache["dir"] is None:
        return "none kept (--cache_dir none)."
    added = f"{_mb(cache['bytes_added'])} added now" if cache["bytes_added"] else "nothing added now"
    return (f"{cache['dir']} holds {_mb(cache['bytes'])} ({added}; {cache['hits']:,} files read from it, "
            f"{cache['misses']:,} tokenized). fit reuses it; delete the directory to free the space, or pass "
            f"--cache_dir none to keep none.")


def _mb(size: int, total: int | None = None) -> str:
    """Bytes (or characters) in MB, e.g. '25.4 MB', or '1.2 / 25.4 MB' out of `total`."""
    return f"{size / 1e6:.1f} MB" if total is None else f"{size / 1e6:.1f} / {total / 1e6:.1f} MB"


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
