"""Secret scanning speed: codetune's `redact_secrets` vs detect-secrets' default plugins.

Run from the repository root (it needs `detect-secrets`, a benchmark-only dependency:
``pip install detect-secrets``)::

    python bench/secret_redaction.py                                   # Rust crates under /usr/share/cargo/registry
    python bench/secret_redaction.py --repo . --ext .py --limit-mb 1   # this repository's Python source

Both tools see the same texts: the files of ``--repo`` with the ``--ext`` extensions as
`codetune.data.files.scan_repository` keeps them (decoded, CRLF -> LF, not redacted), taken in its
path order until the next file would pass ``--limit-mb`` (detect-secrets is slow). MB are 10^6
bytes of UTF-8; lines are counted as `scan_repository` counts them.

* **codetune**: `codetune.data.secrets.redact_secrets(text)` on every text, in memory. The clock
  covers only those calls (file reading excluded); the figure is the best of ``--rounds``.
* **detect-secrets**, through its documented Python API: ``SecretsCollection().scan_file(path)``
  inside ``detect_secrets.settings.default_settings()``, i.e. every built-in plugin and the default
  filters (no opt-in word-list or gibberish filter), one process. `scan_file` takes a path, so the
  texts are first written to a temporary directory (not timed); its clock therefore includes
  opening and reading each file, which the report measures apart (one plain read of every file,
  page cache warm) so that it can be seen to be negligible. It runs once: one run takes tens of
  seconds. Its findings are counted as a baseline stores them, one per (file, secret, type), so a
  value repeated in one file counts once. The ``detect-secrets scan`` CLI would spread files over
  all cores (`scan_files`); codetune redacts in one process, so one process is compared to one.

The ratio is codetune's MB/s over detect-secrets' MB/s; the report also says how many seconds
detect-secrets would add to ingesting the measured texts and, at the same rate, all the texts
``--repo`` holds. The ``load`` column is the 1-minute load average after each measurement: above
the core count, another process shared the cores and the figures are noisy.

Quality cross-check: eight small texts, each with one planted secret of a kind codetune claims to
redact (PEM private key with a base64 body, AWS access key id, GitHub ``ghp_`` token, GitLab
``glpat-`` token, Slack ``xoxb-`` token, Python ``password = "..."``, Rust
``let api_key: &str = "...";``, YAML ``secret_token: ...``). The values come from a fixed-seed
`random.Random` and the prefixes are joined at run time, so they are reproducible, are not real
credentials, and this file holds nothing a secret scanner would flag. codetune *finds* a secret
when no part of it is left in the redacted text; detect-secrets finds it when `scan_file` reports
a secret on one of the lines the planted secret spans. The token kinds sit in literals and plain
assignments, not in calls: detect-secrets' default `is_indirect_reference` filter drops every
line shaped like ``x = f(...)``, whichever plugin matched, so ``client = WebClient("xoxb-...")``
would be missed for a reason that has nothing to do with its Slack detector.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import string
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from codetune.data.files import LANGUAGE_BY_EXTENSION, count_lines, scan_repository
from codetune.data.secrets import redact_secrets

REPO_ROOT = Path(__file__).resolve().parents[1]
# Rust crate sources that `apt-get install librust-serde-json-dev` installs with their dependencies.
CARGO_REGISTRY = Path("/usr/share/cargo/registry")
MB = 1_000_000
SEED = 0
BASE62 = string.ascii_letters + string.digits
BASE64 = BASE62 + "+/"


@dataclass(frozen=True)
class Corpus:
    """The measured texts (relative path -> text) and the size of everything `--repo` held."""

    texts: dict[str, str]
    n_bytes: int
    n_lines: int
    available_files: int
    available_bytes: int


@dataclass(frozen=True)
class Measurement:
    """One tool's pass over the corpus: wall time, findings per kind, and the load after it."""

    tool: str
    seconds: float
    counts: Counter[str]
    files_hit: int
    load: float


@dataclass(frozen=True)
class PlantedSecret:
    """A small text holding one secret: its parts must vanish, and it spans `lines` (1-based)."""

    kind: str
    filename: str
    text: str
    parts: tuple[str, ...]
    lines: range


# -- corpus ----------------------------------------------------------------------------------


def load_corpus(roots: list[Path], extensions: list[str], limit_mb: float) -> Corpus:
    """The kept, unredacted files of `roots`, in path order, up to `limit_mb` MB of UTF-8."""
    available = _kept_texts(roots, extensions)
    texts: dict[str, str] = {}
    n_bytes = 0
    for rel_path, text in available.items():
        size = len(text.encode("utf-8"))
        if n_bytes + size > limit_mb * MB:
            break
        texts[rel_path] = text
        n_bytes += size
    if not texts:
        raise SystemExit(f"the first file is larger than --limit-mb {limit_mb}; raise it")
    available_bytes = sum(len(t.encode("utf-8")) for t in available.values())
    n_lines = sum(count_lines(t) for t in texts.values())
    return Corpus(texts, n_bytes, n_lines, len(available), available_bytes)


def _kept_texts(roots: list[Path], extensions: list[str]) -> dict[str, str]:
    texts = {}
    for i, root in enumerate(roots):
        prefix = f"repo{i}-{root.name}/" if len(roots) > 1 else ""
        texts.update({prefix + f.rel_path: f.text for f in scan_repository(root, extensions, redact=False).files})
    if not texts:
        raise SystemExit(f"no {'/'.join(extensions)} files under {[str(r) for r in roots]}; use --repo and --ext")
    return texts


def write_texts(texts: dict[str, str], directory: Path) -> None:
    """Write every text under `directory` at its relative path, for tools that read files."""
    for rel_path, text in texts.items():
        path = directory / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


# -- codetune --------------------------------------------------------------------------------


def measure_codetune(texts: list[str], rounds: int) -> Measurement:
    """Best of `rounds` passes of `redact_secrets` over in-memory texts (nothing else is timed)."""
    best = float("inf")
    for _ in range(rounds):
        counts: Counter[str] = Counter()
        files_hit = 0
        started = time.perf_counter()
        for text in texts:
            _, found = redact_secrets(text)
            counts.update(found)
            files_hit += bool(found)
        best = min(best, time.perf_counter() - started)
    return Measurement(f"codetune redact_secrets (best of {rounds})", best, counts, files_hit, os.getloadavg()[0])


# -- detect-secrets --------------------------------------------------------------------------


def detect_secrets_findings(directory: Path, rel_paths: list[str]) -> tuple[float, dict[str, set]]:
    """`scan_file` on each file with the default plugins; (seconds, rel path -> PotentialSecrets).

    The clock covers the `scan_file` calls, which open and read each file themselves.
    """
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    with default_settings():
        collection = SecretsCollection(root=str(directory))
        started = time.perf_counter()
        for rel_path in rel_paths:
            collection.scan_file(rel_path)
        seconds = time.perf_counter() - started
    return seconds, {path: set(found) for path, found in collection.data.items() if found}


def measure_detect_secrets(directory: Path, rel_paths: list[str]) -> Measurement:
    """One `scan_file` pass over the corpus written to `directory` (writing it is not timed)."""
    seconds, findings = detect_secrets_findings(directory, rel_paths)
    counts = Counter(secret.type for found in findings.values() for secret in found)
    return Measurement("detect-secrets scan_file (1 run)", seconds, counts, len(findings), os.getloadavg()[0])


def measure_reading(directory: Path, rel_paths: list[str]) -> float:
    """Seconds to open and read every file once as text, as `scan_file` does (part of its clock)."""
    started = time.perf_counter()
    for rel_path in rel_paths:
        with open(directory / rel_path) as f:
            f.read()
    return time.perf_counter() - started


def detect_secrets_plugins() -> list[str]:
    """Class names of the plugins `default_settings()` enables."""
    from detect_secrets.settings import default_settings, get_plugins

    with default_settings():
        return [type(plugin).__name__ for plugin in get_plugins()]


# -- planted secrets -------------------------------------------------------------------------


def build_planted(rng: random.Random) -> list[PlantedSecret]:
    """One text per kind codetune claims to redact; values are random, prefixes joined at run time."""

    def chars(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    pem_label = "RSA " + "PRIVATE" + " KEY"
    pem_body = [chars(BASE64, 64) for _ in range(5)] + [chars(BASE64, 20) + "=="]
    aws = "AK" + "IA" + chars(string.ascii_uppercase + string.digits, 16)
    github = "gh" + "p_" + chars(BASE62, 36)
    gitlab = "gl" + "pat-" + chars(BASE62, 20)
    slack = "xo" + "xb-" + chars(string.digits, 11) + "-" + chars(string.digits, 13) + "-" + chars(BASE62, 24)
    password, api_key, secret_token = chars(BASE62, 24), chars(BASE62, 32), chars(BASE62, 32)
    return [
        _planted("PEM private key", "tls_test.rs", ["// Throwaway key for the handshake test.",
                 'const TEST_KEY: &str = r#"'],
                 [f"-----BEGIN {pem_label}-----", *pem_body, f"-----END {pem_label}-----"], ['"#;'], pem_body),
        _planted("AWS access key id", "storage.py", ["import boto3", ""],
                 [f'DEFAULT_PROFILE = ("{aws}", "us-east-1")'], ["s3 = boto3.client('s3')"], [aws]),
        _planted("GitHub ghp_ token", "release.py", ["import requests", ""],
                 [f'HEADERS = {{"Authorization": "Bearer {github}"}}'],
                 ['requests.get("https://api.github.com/user", headers=HEADERS)'], [github]),
        _planted("GitLab glpat- token", "mirror.sh", ["#!/bin/sh", "set -e"],
                 [f"git remote add mirror https://oauth2:{gitlab}@gitlab.example.com/group/repo.git"],
                 ["git push mirror main"], [gitlab]),
        _planted("Slack xoxb- token", "notify.py", ["from slack_sdk import WebClient", ""],
                 [f'SLACK_BOT = "{slack}"'], ['WebClient(SLACK_BOT).chat_postMessage(channel="#ci", text="done")'],
                 [slack]),
        _planted("Python password", "settings.py", ['DATABASE_HOST = "db.internal"', 'DATABASE_USER = "app"'],
                 ["pass" + f'word = "{password}"'], ["DEBUG = False"], [password]),
        _planted("Rust api_key", "client.rs", ["fn main() {"], ["    let api" + f'_key: &str = "{api_key}";'],
                 ['    println!("{}", api_key.len());', "}"], [api_key]),
        _planted("YAML secret_token", "config.yaml", ["service:", "  name: billing"],
                 ["  secret" + f"_token: {secret_token}"], ["  port: 8080"], [secret_token]),
    ]


def _planted(kind: str, filename: str, head: list[str], secret: list[str], tail: list[str],
             parts: list[str]) -> PlantedSecret:
    first = len(head) + 1
    text = "\n".join(head + secret + tail) + "\n"
    return PlantedSecret(kind, filename, text, tuple(parts), range(first, first + len(secret)))


def codetune_verdict(case: PlantedSecret) -> str:
    """'redacted (kinds)' when no part of the secret is left in the redacted text, else 'MISSED'."""
    redacted, counts = redact_secrets(case.text)
    if any(part in redacted for part in case.parts):
        return "MISSED"
    return "redacted (" + ", ".join(sorted(counts)) + ")"


def detect_secrets_verdicts(cases: list[PlantedSecret], directory: Path) -> list[str]:
    """'found (types)' when `scan_file` reports a secret on a line the planted one spans, else 'MISSED'."""
    write_texts({case.filename: case.text for case in cases}, directory)
    _, findings = detect_secrets_findings(directory, [case.filename for case in cases])
    verdicts = []
    for case in cases:
        types = sorted({s.type for s in findings.get(case.filename, ()) if s.line_number in case.lines})
        verdicts.append("found (" + ", ".join(types) + ")" if types else "MISSED")
    return verdicts


# -- report ----------------------------------------------------------------------------------


def format_table(corpus: Corpus, rows: list[Measurement]) -> str:
    lines = [f"{'tool':<40} {'seconds':>8} {'MB/s':>8} {'findings':>8} {'files hit':>9} {'load':>5}"]
    for m in rows:
        lines.append(f"{m.tool:<40} {m.seconds:>8.3f} {corpus.n_bytes / MB / m.seconds:>8.2f} "
                     f"{sum(m.counts.values()):>8,} {m.files_hit:>9,} {m.load:>5.1f}")
    return "\n".join(lines)


def format_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in counts.most_common()) or "none"


def format_planted(cases: list[PlantedSecret], ours: list[str], theirs: list[str]) -> str:
    lines = [f"{'planted secret':<20} {'file':<12} {'codetune':<28} detect-secrets"]
    for case, our, their in zip(cases, ours, theirs):
        lines.append(f"{case.kind:<20} {case.filename:<12} {our:<28} {their}")
    return "\n".join(lines)


def print_speed(corpus: Corpus, ours: Measurement, theirs: Measurement, read_seconds: float) -> None:
    print(format_table(corpus, [ours, theirs]))
    print(f"codetune redactions by kind: {format_counts(ours.counts)}")
    print(f"detect-secrets findings by type: {format_counts(theirs.counts)}")
    print(f"detect-secrets' clock includes reading the files; one plain read of all of them takes "
          f"{read_seconds:.3f} s ({read_seconds / theirs.seconds:.2%} of its time)")
    busiest = max(ours.load, theirs.load)
    if busiest > (os.cpu_count() or 1) + 0.5:
        print(f"NOTE: load average {busiest:.1f} on {os.cpu_count()} cores: other processes shared the cores, "
              f"so the figures are noisy; rerun when the machine is idle.")
    ratio = theirs.seconds / ours.seconds  # same bytes, so the ratio of MB/s
    full_s = corpus.available_bytes / (corpus.n_bytes / theirs.seconds)
    print(f"\ncodetune/detect-secrets throughput = {ratio:,.0f}x: detect-secrets would add {theirs.seconds:.1f} s "
          f"to ingesting these {corpus.n_bytes / MB:.2f} MB (codetune redacts them in {ours.seconds:.3f} s), "
          f"~{full_s:.0f} s for all {corpus.available_bytes / MB:.2f} MB of --repo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, action="append", default=None,
                        help=f"corpus directory (repeatable; default: {CARGO_REGISTRY} if it exists, "
                             "else this repository)")
    parser.add_argument("--ext", action="append", default=None, help="file extension to scan (repeatable; .rs)")
    parser.add_argument("--limit-mb", type=float, default=5.0,
                        help="stop adding files before the corpus passes this many MB (detect-secrets is slow)")
    parser.add_argument("--rounds", type=int, default=3, help="codetune passes; the best is reported")
    args = parser.parse_args(argv)
    args.repo = args.repo or [CARGO_REGISTRY if CARGO_REGISTRY.is_dir() else REPO_ROOT]
    args.ext = args.ext or [".rs"]
    problems = [f"--repo {repo}: not a directory" for repo in args.repo if not repo.is_dir()]
    problems += [f"--ext {ext}: not supported; use one of {', '.join(sorted(LANGUAGE_BY_EXTENSION))}"
                 for ext in args.ext if ext.lower() not in LANGUAGE_BY_EXTENSION]
    if args.limit_mb <= 0:
        problems.append(f"--limit-mb {args.limit_mb}: must be > 0")
    if args.rounds < 1:
        problems.append(f"--rounds {args.rounds}: must be >= 1")
    if importlib.util.find_spec("detect_secrets") is None:
        problems.append("detect-secrets is not installed: it is a benchmark-only dependency, "
                        "`pip install detect-secrets`")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    corpus = load_corpus(args.repo, args.ext, args.limit_mb)
    plugins = detect_secrets_plugins()
    print(f"corpus: {len(corpus.texts):,} {'/'.join(args.ext)} files, {corpus.n_bytes / MB:.2f} MB, "
          f"{corpus.n_lines:,} lines (path order, up to --limit-mb {args.limit_mb:g}; --repo "
          f"{', '.join(map(str, args.repo))} holds {corpus.available_files:,} files, "
          f"{corpus.available_bytes / MB:.2f} MB)")
    print(f"versions: python {platform.python_version()}, detect-secrets {version('detect-secrets')}, "
          f"codetune {version('codetune')}; {os.cpu_count()} cores")
    print(f"detect-secrets default_settings(): {len(plugins)} plugins: {', '.join(plugins)}\n", flush=True)

    ours = measure_codetune(list(corpus.texts.values()), args.rounds)
    with tempfile.TemporaryDirectory(prefix="codetune-bench-secrets-") as tmp:
        write_texts(corpus.texts, Path(tmp))
        theirs = measure_detect_secrets(Path(tmp), list(corpus.texts))
        read_seconds = measure_reading(Path(tmp), list(corpus.texts))
    print_speed(corpus, ours, theirs, read_seconds)

    cases = build_planted(random.Random(SEED))
    with tempfile.TemporaryDirectory(prefix="codetune-bench-planted-") as tmp:
        theirs_found = detect_secrets_verdicts(cases, Path(tmp))
    print(f"\nplanted secrets (random values, seed {SEED}):")
    print(format_planted(cases, [codetune_verdict(case) for case in cases], theirs_found))


if __name__ == "__main__":
    main()
