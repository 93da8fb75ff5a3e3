"""Deterministic file-level train/validation split.

A file goes to validation when a hash of (seed, relative path) falls below `val_fraction`. The
decision depends on nothing but the path, so it is stable when other files are added or removed,
identical on every rank and every run, and a file is never on both sides. With one file, or
`val_fraction` 0, there is no validation file: `no_validation_problem` says what is then missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_VAL_FRACTION = 0.1  # --data.val_fraction; `inspect` and the ingest bench split the same way


def _unit_hash(rel_path: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{rel_path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_paths(rel_paths: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) paths. With two files or more and `val_fraction` > 0, each side gets at least one."""
    scores = {p: _unit_hash(p, seed) for p in rel_paths}
    val = [p for p in rel_paths if scores[p] < val_fraction]
    if val_fraction > 0 and len(rel_paths) >= 2:
        if not val:
            val = [min(rel_paths, key=scores.__getitem__)]
        if len(val) == len(rel_paths):
            val.remove(max(val, key=scores.__getitem__))
    val_set = set(val)
    return [p for p in rel_paths if p not in val_set], [p for p in rel_paths if p in val_set]


def no_validation_problem(n_files: int, n_val: int, val_fraction: float) -> str | None:
    """What a run misses when the split leaves no validation file, and the fix; None when it has one."""
    if n_val:
        return None
    if val_fraction == 0:
        why, fix = "--data.val_fraction is 0", "set --data.val_fraction above 0, e.g. 0.1"
    else:
        why = f"only {n_files} file was kept, and it trains"
        fix = ("train on a repository with two files or more (`codetune inspect REPO` shows what is kept and "
               "skipped), or loosen --data.extensions / --data.ignore_patterns")
    return (f"the split left no validation file ({why}), so there is no held-out perplexity (val/loss) and no "
            f"repo-prompt metrics (next_line_exact_match, chrf, syntax_valid): the eval table will be all —. "
            f"To get them, {fix}.")
