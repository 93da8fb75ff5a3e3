"""The repository scan as a fit (or `codetune prepare`) needs it: the files to train on, or one error that says why
there are none (everything skipped, no file with a wanted extension, or no source code at all, only prose and
configs), naming the flags to change; and what the manifest's `phase_1_scan` records of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codetune.data.files import ScanResult, scan_repository
from codetune.data.languages import code_extensions, no_code_problem
from codetune.errors import ConfigError

# Places per secret kind that phase_1_scan names (`secrets_redacted` has the full count).
SECRET_LOCATIONS_RECORDED = 20


def scan_for_training(repo: Path, extensions: Sequence[str], ignore_patterns: Sequence[str], max_file_bytes: int,
                      max_line_length: int) -> ScanResult:
    """`scan_repository` of --data.repo; ConfigError when it keeps nothing, or nothing that is code."""
    scan = scan_repository(repo, extensions, ignore_patterns, max_file_bytes, max_line_length)
    if not scan.files:
        counts = scan.skip_counts()
        why = (f"all {sum(counts.values())} candidate files were skipped ({format_counts(counts)})"
               if counts else f"no file has one of the extensions {extensions}")
        raise ConfigError(
            f"--data.repo {str(repo)!r}: nothing to train on: {why}. Check --data.extensions "
            f"and --data.ignore_patterns, or run `codetune inspect {repo}`."
        )
    problem = no_code_problem(scan.files)
    if problem:
        raise ConfigError(no_code_message(repo, extensions, problem, scan.skip_counts()))
    return scan


def no_code_message(repo: Path, extensions: Sequence[str], problem: str, skip_counts: dict[str, int]) -> str:
    """Why a repository whose kept files hold no source code is refused, and what to point --data.repo at."""
    extensions = list(extensions)
    code = code_extensions(extensions)
    looked_for = (f"of which {', '.join(code)} are code" if code
                  else "none of these is a programming language's")
    skipped = f"; skipped: {format_counts(skip_counts)}" if skip_counts else ""
    return (f"--data.repo {str(repo)!r}: no source code to train on: {problem}. It looked for "
            f"--data.extensions {extensions} ({looked_for}){skipped}. A code model learns nothing about your code "
            f"from prose and config files alone: point --data.repo at the repository's source tree, or add its "
            f"languages' extensions to --data.extensions (e.g. '.py', '.rs'); `codetune inspect {repo}` lists "
            f"what is kept and skipped.")


def scan_report(scan: ScanResult, wall_s: float) -> dict[str, Any]:
    """The manifest's phase_1_scan: files kept and skipped, secrets replaced (and where), lines, wall time."""
    return {
        "files_kept": len(scan.files),
        "files_skipped": scan.skip_counts(),
        "secrets_redacted": dict(scan.secrets_redacted),
        "secret_locations": scan.secret_locations(SECRET_LOCATIONS_RECORDED),
        "lines": int(sum(f.n_lines for f in scan.files)),
        "wall_s": round(wall_s, 3),
    }


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
