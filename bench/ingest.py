"""Ingest speed: scan, tokenize (cold and warm cache) and pack a repository, against the goals we promise.

Run from the repository root::

    python bench/ingest.py                                   # /usr/share/cargo/registry, .rs (else this repo)
    python bench/ingest.py /usr/share/cargo/registry/libc-0.2.139 --extensions .rs   # one ~100k-line crate
    python bench/ingest.py . --rounds 5                      # this repository, the DataModule's default extensions
    python bench/ingest.py REPO --tokenizer path/to/hf_model_dir    # a real model's tokenizer instead

Why: every `codetune fit` starts with this ingest, and a user who re-runs on an unchanged repository
should wait for the model, not for the data. Every figure comes from one process and the same kept
texts, so the ratios compare like with like:

1. **scan**: `codetune.data.files.scan_repository(REPO, extensions)` (walk, filters, secret
   redaction). Files/s count kept files; MB are 10^6 bytes of the kept texts in UTF-8.
2. **bare**: the tokenizer's Rust backend alone, ``backend_tokenizer.encode_batch_fast(texts,
   add_special_tokens=False)`` over the kept texts: the floor any Python wrapper adds to.
3. **cold**: `codetune.data.tokens.tokenize_cached(tokenizer, texts, cache_dir)` into a cache
   directory that does not exist yet: fingerprint, keys, one miss per text, the same encoding, and
   one atomic write per text. Goal: cold tokens/s at least 0.8 of bare, i.e. the cache costs at
   most a quarter of the encoding it saves next time. Bare and cold alternate round by round, so a
   busy neighbour slows both alike.
4. **warm**: `scan_repository` then `tokenize_cached` on the cache that the last cold round filled:
   the whole ingest of an unchanged repository before packing. The bench checks that every text was
   a hit and that the ids equal the bare encoding. Goal: a ~100k-line crate in under 1 s, reported
   as the warm wall time scaled to 100k lines (fixed costs, such as the tokenizer fingerprint, are
   then spread over the whole corpus: run the bench on one such crate to see them whole).
5. **packing**: `codetune.data.packing.pack_windows` in `isolated` mode at seq_len 2048 and 4096,
   on the training split that `CodeDataModule` makes with its defaults (``val_fraction=0.1``, seed
   0). Goal: `Windows.efficiency` (real tokens / window tokens) of at least 99.5%.

Tokenizer: by default a byte-level BPE with a ``--vocab-size`` (32,768) vocabulary trained on the
kept texts by `codetune.model.tiny.train_tokenizer`, the size of a real code model's vocabulary
rather than the 2,048 tokens of the tiny demo model (a larger vocabulary means fewer, longer tokens
and a different encoding speed). Its training time is reported on its own line and is in no ratio.
``--tokenizer DIR`` loads a local Hugging Face tokenizer instead (`AutoTokenizer.from_pretrained`,
through `codetune.data.tokens.load_tokenizer`, which insists on a fast tokenizer with an EOS token).

Timing: every figure is the best of ``--rounds`` (default 3) wall-clock runs with `time.perf_counter`.
Each cold round writes into a directory that does not exist yet (``cold-<round>`` in one
`tempfile.TemporaryDirectory`, removed at the end), so none reads another's entries. The page
cache stays warm throughout, as it does when a user re-runs: the scan and the warm pass read files
the previous round read. The ``load`` column is the 1-minute load average after each step; above
the core count, another process shared the cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from codetune.data.files import DEFAULT_EXTENSIONS, LANGUAGE_BY_EXTENSION, ScanResult, scan_repository
from codetune.data.fim import (DEFAULT_FIM_RATE, DEFAULT_MIDDLES, FimEpochs, NewlineTable, find_fim_tokens,
                               training_samples)
from codetune.data.packing import Windows, pack_samples, pack_windows, whole_placements
from codetune.data.split import DEFAULT_VAL_FRACTION, split_paths
from codetune.data.tokens import load_tokenizer, pad_token_id, tokenize_cached
from codetune.data.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Rust crate sources that `apt-get install librust-serde-json-dev` installs with their dependencies.
CARGO_REGISTRY = Path("/usr/share/cargo/registry")
MB = 1_000_000
SEQ_LENS = (2048, 4096)

GOAL_COLD_RATIO = 0.8
GOAL_WARM_S_PER_100K_LINES = 1.0
GOAL_PACKING_EFFICIENCY = 0.995
GOAL_FIM_EXTRA = 0.10  # FIM adds at most 10% to an ingest
FIM_SEQ_LEN = 2048

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One timed step: best wall time, what it produced, and the load average after it."""

    name: str
    seconds: float
    throughput: str
    load: float


@dataclass(frozen=True)
class Goal:
    """A promised figure: what was measured, the target, and whether it was met."""

    name: str
    measured: str
    target: str
    met: bool


@dataclass
class Report:
    """The steps and goals, in the order they were measured."""

    steps: list[Step] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)

    def step(self, name: str, seconds: float, throughput: str) -> None:
        self.steps.append(Step(name, seconds, throughput, os.getloadavg()[0]))

    def goal(self, name: str, measured: str, target: str, met: bool) -> None:
        self.goals.append(Goal(name, measured, target, met))


@dataclass(frozen=True)
class Corpus:
    """What the scan kept: the texts every later step works on, and their size."""

    repo: Path
    extensions: list[str]
    scan: ScanResult
    texts: list[str]
    n_bytes: int
    n_lines: int


def best_of(rounds: int, run: Callable[[], T]) -> tuple[float, T]:
    """Shortest wall time of `rounds` calls of `run`, and the last call's result."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


# -- the steps ---------------------------------------------------------------------------------


def measure_scan(repo: Path, extensions: list[str], rounds: int) -> tuple[float, ScanResult]:
    seconds, scan = best_of(rounds, lambda: scan_repository(repo, extensions))
    if not scan.files:
        raise SystemExit(f"no {' '.join(extensions)} file kept under {repo} ({scan.skip_counts()}); "
                         f"use --extensions")
    return seconds, scan


def build_tokenizer(tokenizer_dir: Path | None, texts: list[str], vocab_size: int) -> tuple[Any, float, str]:
    """The tokenizer, the seconds it took to train or load, and a line that says which it is."""
    started = time.perf_counter()
    if tokenizer_dir is None:
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
        what = f"byte-level BPE trained on the kept texts, --vocab-size {vocab_size:,} -> {len(tokenizer):,} tokens"
    else:
        tokenizer = load_tokenizer(str(tokenizer_dir), ())
        what = f"{tokenizer_dir} ({type(tokenizer).__name__}, {len(tokenizer):,} tokens)"
    return tokenizer, time.perf_counter() - started, what


def measure_encoding(tokenizer: Any, texts: list[str], rounds: int,
                     work: Path) -> tuple[float, float, list[np.ndarray]]:
    """Best bare and best cold seconds (alternating rounds) and the bare ids; `work/cold-<last>` stays filled."""
    bare_best = cold_best = float("inf")
    for i in range(rounds):
        started = time.perf_counter()
        # Only the backend call is the baseline; the conversion to arrays is checked, not timed.
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        bare_best = min(bare_best, time.perf_counter() - started)
        cache_dir = work / f"cold-{i}"
        started = time.perf_counter()
        _, stats = tokenize_cached(tokenizer, texts, cache_dir)
        cold_best = min(cold_best, time.perf_counter() - started)
        if stats.hits:
            raise AssertionError(f"cold round {i} found {stats.hits} cache hits in a new directory")
    return bare_best, cold_best, [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def measure_warm(repo: Path, extensions: list[str], tokenizer: Any, cache_dir: Path, rounds: int,
                 want: list[np.ndarray]) -> float:
    """Best seconds of scan + cached tokenization of an unchanged repository; every text must hit."""

    def ingest() -> tuple[list[np.ndarray], Any]:
        scan = scan_repository(repo, extensions)
        return tokenize_cached(tokenizer, [f.text for f in scan.files], cache_dir)

    seconds, (ids, stats) = best_of(rounds, ingest)
    if stats.misses or len(ids) != len(want) or not all(np.array_equal(a, b) for a, b in zip(ids, want)):
        raise AssertionError(f"warm pass: {stats.misses} misses, or ids that differ from the bare encoding")
    return seconds


def measure_packing(train_ids: list[np.ndarray], tokenizer: Any, seq_len: int, rounds: int) -> tuple[float, Windows]:
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    return best_of(rounds, lambda: pack_windows(train_ids, seq_len, eos, pad, "isolated"))


def train_split(scan: ScanResult, ids: list[np.ndarray]) -> list[np.ndarray]:
    """The ids of the files `CodeDataModule` trains on with its default split (same order)."""
    return train_files(scan, ids)[1]


def train_files(scan: ScanResult, ids: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """The paths and ids of the files `CodeDataModule` trains on with its default split (same order)."""
    by_path = dict(zip((f.rel_path for f in scan.files), ids))
    train_paths, _ = split_paths(list(by_path), DEFAULT_VAL_FRACTION)  # seed 0, as CodeDataModule
    return train_paths, [by_path[p] for p in train_paths]


def measure_samples(paths: list[str], ids: list[np.ndarray], tokenizer: Any, fim_rate: float,
                    rounds: int, table_dir: Path | None = None) -> tuple[float, Windows, int]:
    """Best seconds of what `CodeDataModule` does after tokenizing, at `fim_rate` (with FIM: the newline table
    of the tokenizer, computed or read from `table_dir` as the token cache keeps it, pieces, draws and samples),
    packing included; the windows and the FIM sample count."""
    eos, pad, tokens = tokenizer.eos_token_id, pad_token_id(tokenizer), find_fim_tokens(tokenizer)

    def build() -> tuple[Windows, int]:
        table = NewlineTable.of(tokenizer, table_dir) if fim_rate else None
        samples = training_samples(paths, ids, eos, FIM_SEQ_LEN, 0, fim_rate, 0.5, tokens, table,
                                   mix=DEFAULT_MIDDLES)
        return pack_samples(samples.stream, samples.whole, FIM_SEQ_LEN, pad), len(samples.records)

    seconds, (windows, n_fim) = best_of(rounds, build)
    return seconds, windows, n_fim


# -- report ------------------------------------------------------------------------------------


def format_steps(steps: list[Step]) -> str:
    lines = [f"{'step':<48} {'seconds':>8}  {'load':>4}  throughput"]
    lines += [f"{s.name:<48} {s.seconds:>8.3f}  {s.load:>4.1f}  {s.throughput}" for s in steps]
    return "\n".join(lines)


def format_goals(goals: list[Goal]) -> str:
    lines = [f"{'goal':<48} {'measured':>10}  {'target':<9} verdict"]
    lines += [f"{g.name:<48} {g.measured:>10}  {g.target:<9} {'PASS' if g.met else 'MISS'}" for g in goals]
    return "\n".join(lines)


def describe_corpus(corpus: Corpus) -> str:
    skipped = ", ".join(f"{reason} {n:,}" for reason, n in corpus.scan.skip_counts().items()) or "none"
    return (f"corpus: {corpus.repo}, {' '.join(corpus.extensions)}: {len(corpus.texts):,} files kept, "
            f"{corpus.n_lines:,} lines, {corpus.n_bytes / MB:.2f} MB (skipped: {skipped}; "
            f"secrets redacted: {sum(corpus.scan.secrets_redacted.values())})")


def describe_machine() -> str:
    return (f"machine: {os.cpu_count()} cores, python {platform.python_version()}, tokenizers "
            f"{version('tokenizers')}, transformers {version('transformers')}, codetune {version('codetune')}")


def print_report(report: Report) -> None:
    print(format_steps(report.steps))
    print()
    print(format_goals(report.goals))
    busiest = max(s.load for s in report.steps)
    if busiest > (os.cpu_count() or 1) + 0.5:
        print(f"NOTE: load average {busiest:.1f} on {os.cpu_count()} cores: other processes shared the cores, "
              f"so the figures are noisy; rerun when the machine is idle.")


# -- one run -----------------------------------------------------------------------------------


def run_scan(repo: Path, extensions: list[str], rounds: int, report: Report) -> Corpus:
    seconds, scan = measure_scan(repo, extensions, rounds)
    texts = [f.text for f in scan.files]
    corpus = Corpus(repo, extensions, scan, texts, sum(len(t.encode("utf-8")) for t in texts),
                    sum(f.n_lines for f in scan.files))
    report.step(f"scan (scan_repository, best of {rounds})", seconds,
                f"{len(texts) / seconds:,.0f} files/s, {corpus.n_bytes / MB / seconds:.1f} MB/s, "
                f"{corpus.n_lines / seconds:,.0f} lines/s")
    return corpus


def run_tokenization(corpus: Corpus, tokenizer: Any, rounds: int, report: Report) -> list[np.ndarray]:
    """Bare, cold and warm steps and their goals; returns the token ids of every kept text."""
    with tempfile.TemporaryDirectory(prefix="codetune-bench-ingest-") as tmp:
        bare_s, cold_s, ids = measure_encoding(tokenizer, corpus.texts, rounds, Path(tmp))
        filled = Path(tmp) / f"cold-{rounds - 1}"
        warm_s = measure_warm(corpus.repo, corpus.extensions, tokenizer, filled, rounds, ids)
    n_tokens = sum(len(x) for x in ids)
    report.step(f"bare encode_batch_fast (best of {rounds})", bare_s,
                f"{n_tokens / bare_s:,.0f} tokens/s ({n_tokens:,} tokens)")
    report.step(f"cold tokenize_cached, empty cache (best of {rounds})", cold_s, f"{n_tokens / cold_s:,.0f} tokens/s")
    report.step(f"warm scan + tokenize_cached (best of {rounds})", warm_s,
                f"{corpus.n_lines / warm_s:,.0f} lines/s, all {len(ids):,} texts hit, ids = bare")
    ratio, per_100k = bare_s / cold_s, warm_s * 100_000 / corpus.n_lines
    report.goal("cold/bare tokens/s", f"{ratio:.2f}", f">= {GOAL_COLD_RATIO}", ratio >= GOAL_COLD_RATIO)
    report.goal("warm ingest, scaled to 100k lines", f"{per_100k:.3f} s", f"< {GOAL_WARM_S_PER_100K_LINES:g} s",
                per_100k < GOAL_WARM_S_PER_100K_LINES)
    return ids


def run_packing(corpus: Corpus, ids: list[np.ndarray], tokenizer: Any, rounds: int, report: Report) -> None:
    train_ids = train_split(corpus.scan, ids)
    for seq_len in SEQ_LENS:
        seconds, windows = measure_packing(train_ids, tokenizer, seq_len, rounds)
        report.step(f"pack_windows isolated, seq_len {seq_len} (train)", seconds,
                    f"{len(windows):,} windows of {len(train_ids):,} files")
        report.goal(f"packing efficiency, seq_len {seq_len} (train)", f"{windows.efficiency:.4%}",
                    f">= {GOAL_PACKING_EFFICIENCY:.1%}", windows.efficiency >= GOAL_PACKING_EFFICIENCY)


def run_fim(corpus: Corpus, ids: list[np.ndarray], tokenizer: Any, rounds: int, report: Report,
            scan_s: float, cold_s: float, warm_s: float) -> None:
    """What FIM at its default rate adds to an ingest: cold (scan + cold tokenization + samples) and warm."""
    if find_fim_tokens(tokenizer) is None:
        print("FIM: the tokenizer has no FIM tokens; nothing to measure", flush=True)
        return
    paths, train_ids = train_files(corpus.scan, ids)
    plain_s, plain, _ = measure_samples(paths, train_ids, tokenizer, 0.0, rounds)
    fim_s, windows, n_fim = measure_samples(paths, train_ids, tokenizer, DEFAULT_FIM_RATE, rounds)
    with tempfile.TemporaryDirectory(prefix="codetune-bench-fim-") as tmp:
        NewlineTable.of(tokenizer, Path(tmp))  # a re-run finds the table in the token cache
        warm_fim_s, _, _ = measure_samples(paths, train_ids, tokenizer, DEFAULT_FIM_RATE, rounds, Path(tmp))
    report.step(f"samples + pack, no FIM, seq_len {FIM_SEQ_LEN} (best of {rounds})", plain_s,
                f"{len(plain):,} windows, efficiency {plain.efficiency:.4%}")
    report.step(f"samples + pack, fim_rate {DEFAULT_FIM_RATE} (best of {rounds})", fim_s,
                f"{len(windows):,} windows, {n_fim:,} FIM samples, efficiency {windows.efficiency:.4%}")
    report.step("  the same, newline table from the cache", warm_fim_s, "as an unchanged re-run")
    samples = training_samples(paths, train_ids, tokenizer.eos_token_id, FIM_SEQ_LEN, 0, DEFAULT_FIM_RATE, 0.5,
                               find_fim_tokens(tokenizer), NewlineTable.of(tokenizer), mix=DEFAULT_MIDDLES)
    epochs = FimEpochs(windows.input_ids, whole_placements([len(w) for w in samples.whole], FIM_SEQ_LEN),
                       samples.fim_pieces, find_fim_tokens(tokenizer), tokenizer.eos_token_id, 0, 0.5,
                       DEFAULT_MIDDLES)
    redraw_s, _ = best_of(rounds, lambda: epochs._build(1))
    report.step("FIM redraw of one epoch (per epoch, not ingest)", redraw_s,
                f"{len(samples.fim_pieces):,} samples cut anew in {len(windows):,} windows")
    for name, base, with_fim in (("cold", scan_s + cold_s + plain_s, fim_s), ("warm", warm_s + plain_s, warm_fim_s)):
        extra = (with_fim - plain_s) / base
        report.goal(f"FIM's extra time, {name} ingest", f"{extra:+.2%}", f"< {GOAL_FIM_EXTRA:.0%}",
                    extra < GOAL_FIM_EXTRA)
    report.goal(f"packing efficiency with FIM, seq_len {FIM_SEQ_LEN}", f"{windows.efficiency:.4%}",
                f">= {GOAL_PACKING_EFFICIENCY:.1%}", windows.efficiency >= GOAL_PACKING_EFFICIENCY)


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", nargs="?", type=Path, default=None, metavar="REPO",
                        help=f"repository to ingest (default: {CARGO_REGISTRY} if it exists, else this repository)")
    parser.add_argument("--extensions", nargs="+", default=None, metavar="EXT",
                        help="extensions to keep, with the dot (default: .rs for the cargo registry, "
                             "else the DataModule's default list)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per step; the best is reported")
    parser.add_argument("--vocab-size", type=int, default=32_768, help="vocabulary of the trained BPE tokenizer")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="local Hugging Face tokenizer directory to use instead of training one")
    args = parser.parse_args(argv)
    if args.repo is None:
        args.repo = CARGO_REGISTRY if CARGO_REGISTRY.is_dir() else REPO_ROOT
    if args.extensions is None:
        args.extensions = [".rs"] if args.repo.resolve() == CARGO_REGISTRY else list(DEFAULT_EXTENSIONS)
    problems = [] if args.repo.is_dir() else [f"REPO {args.repo}: not a directory"]
    problems += [f"--extensions {ext}: not supported; use one of {', '.join(sorted(LANGUAGE_BY_EXTENSION))}"
                 for ext in args.extensions if ext.lower() not in LANGUAGE_BY_EXTENSION]
    if args.rounds < 1:
        problems.append(f"--rounds {args.rounds}: must be >= 1")
    if args.vocab_size < 512:
        problems.append(f"--vocab-size {args.vocab_size}: must be >= 512 (256 bytes + merges)")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        problems.append(f"--tokenizer {args.tokenizer}: not a directory (give a local model or tokenizer dir)")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = Report()
    corpus = run_scan(args.repo, args.extensions, args.rounds, report)
    print(describe_corpus(corpus))
    print(describe_machine())
    tokenizer, seconds, what = build_tokenizer(args.tokenizer, corpus.texts, args.vocab_size)
    print(f"tokenizer: {what}\n", flush=True)
    report.step("tokenizer train/load (not in any ratio)", seconds, f"{len(tokenizer):,} tokens")
    ids = run_tokenization(corpus, tokenizer, args.rounds, report)
    run_packing(corpus, ids, tokenizer, args.rounds, report)
    seconds = {s.name.split(" ")[0]: s.seconds for s in report.steps}
    run_fim(corpus, ids, tokenizer, args.rounds, report, seconds["scan"], seconds["cold"], seconds["warm"])
    print_report(report)


if __name__ == "__main__":
    main()
