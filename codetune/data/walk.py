"""Walk a repository's tree by name: which files to read, and which files and directories to leave out.

**Walk.** An explicit-stack depth-first walk with `os.scandir`. Symlinks are resolved with
`os.path.realpath(strict=True)`, which raises on dangling links and on loops instead of hanging:

* a directory symlink is never descended. If its target is outside the repository, dangling, or
  the link's own directory or one of its ancestors (a loop), it is skipped as `symlink_outside`;
  if its target is elsewhere inside the repository it is skipped as `duplicate`, because the
  target is walked under its real path.
* a file symlink to a file inside the repository is read (an identical copy is then dropped as a
  duplicate), unless the target is a secret file or lies in `.git`; one pointing outside, dangling
  or looping is `symlink_outside`.

**Ignore rules.** Three layers of gitwildmatch patterns, asked in order; the first layer with a
matching pattern decides, and a `!pattern` match means "keep":

1. `ignore_patterns` from the config: the user's explicit word, so it overrides the others
   (`!vendor/` re-includes a default).
2. Every `.gitignore` in the tree, from the entry's own directory up to the root, each matched
   against the path relative to its own directory: git's precedence, where the closest file
   wins and within a file the last matching line wins (`pathspec.GitIgnoreSpec`).
3. `DEFAULT_IGNORE_PATTERNS`: build output, dependency trees, vendored code, lockfiles.

An ignored directory is pruned, never read, and reported once as its path with a trailing `/`;
as in git, a file inside an ignored directory cannot be re-included. `.git` is always pruned.
Not read: `.git/info/exclude` and the user's global excludes file, which would make a scan depend
on the machine it runs on.

**codetune's own output** is never training data, wherever it is and whatever the ignore rules
say (a `!pattern` cannot re-include it): a directory is pruned as `codetune_output` when it holds
one of `CODETUNE_OUTPUT_MARKERS` whose JSON has that marker's key (a run directory's MANIFEST.json,
`codetune prepare --out`'s data_report.json, `codetune merge --out`'s codetune_merge.json), or when
it is the `tokens/` directory of a token cache (only `v<format>-<tokenizer fingerprint>/`
directories, the layout of `codetune.data.tokens`). It is recognised by what codetune writes, not
by a name such as `runs/`, so any `--runs_dir`, `--out` or `--data.cache_dir` is covered, and it
costs one look at each directory's entry names, plus a JSON parse where a marker's name appears.

**Name checks**, in this order: ignored, secret file (`secrets.is_secret_file`), extension, then symlink
target (above) and file type (sockets, FIFOs and devices are `binary` and never opened: a FIFO would block
the read forever).
"""

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pathspec

from codetune.data.secrets import is_secret_file
from codetune.data.skip_reasons import (SKIP_BINARY, SKIP_CODETUNE_OUTPUT, SKIP_DUPLICATE, SKIP_EXTENSION,
                                        SKIP_IGNORED, SKIP_SECRET_FILE, SKIP_SYMLINK, SkippedFile)
from codetune.storage import EXPORT_MARKER, MANIFEST_NAME, MERGE_MARKER, PREPARE_MARKER

# A directory codetune wrote holds one of these files, a JSON object that always has the given key.
CODETUNE_OUTPUT_MARKERS: dict[str, str] = {
    MANIFEST_NAME: "phase_results",  # a run directory (codetune.run.Manifest)
    PREPARE_MARKER: "phase_1_scan",  # codetune prepare --out
    MERGE_MARKER: "source_run",  # codetune merge --out
    EXPORT_MARKER: "source_run",  # codetune export --out
}
# <cache_dir>/tokens/<CACHE_FORMAT>-<32 hex digits of the tokenizer fingerprint>/ (codetune.data.tokens).
TOKEN_CACHE_DIR = "tokens"
_TOKEN_CACHE_ENTRY = re.compile(r"v\d+-[0-9a-f]{32}")

DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    # version control, build output and caches
    ".git/",
    ".hg/",
    ".svn/",
    "target/",
    "build/",
    "dist/",
    "out/",
    "__pycache__/",
    "*.egg-info/",
    ".eggs/",
    ".tox/",
    ".nox/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".cache/",
    ".next/",
    ".gradle/",
    "coverage/",
    "htmlcov/",
    # dependencies and code written by someone else
    "node_modules/",
    ".venv/",
    "venv/",
    "vendor/",
    "third_party/",
    "third-party/",
    "site-packages/",
    # compiled or minified artefacts
    "*.rlib",
    "*.rmeta",
    "*.min.js",
    "*.min.css",
    "*.map",
    # lockfiles: long, machine-written, nothing to learn
    "Cargo.lock",
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "uv.lock",
    "Pipfile.lock",
    "composer.lock",
    "Gemfile.lock",
    "flake.lock",
    "go.sum",
)

_DEFAULT_SPEC = pathspec.GitIgnoreSpec.from_lines(DEFAULT_IGNORE_PATTERNS)

# The .gitignore layers met on the way down: (relative directory with trailing "/", its spec), root first.
GitIgnores = tuple[tuple[str, pathspec.GitIgnoreSpec], ...]


@dataclass(frozen=True)
class Candidate:
    """A file that passed the name checks: where it is reported and where its bytes are."""

    rel_path: str
    path: str


@dataclass(frozen=True)
class IgnoreRules:
    """The three layers of ignore patterns; see the module docstring for their precedence."""

    config: pathspec.GitIgnoreSpec
    defaults: pathspec.GitIgnoreSpec

    @classmethod
    def of(cls, ignore_patterns: Sequence[str]) -> "IgnoreRules":
        """The config's `ignore_patterns` over `DEFAULT_IGNORE_PATTERNS`."""
        return cls(pathspec.GitIgnoreSpec.from_lines(ignore_patterns), _DEFAULT_SPEC)

    def is_ignored(self, rel_path: str, is_dir: bool, gitignores: GitIgnores) -> bool:
        # A trailing slash is how gitwildmatch tells a directory from a file ("target/" vs "target").
        path = rel_path + "/" if is_dir else rel_path
        layers = (("", self.config), *reversed(gitignores), ("", self.defaults))
        for base, spec in layers:
            include = spec.check_file(path[len(base) :]).include
            if include is not None:
                return include
        return False


def walk_repository(
    root: str, rules: IgnoreRules, extensions: frozenset[str]
) -> tuple[list[Candidate], list[SkippedFile]]:
    """Depth-first walk from the real path `root`; returns the files to read and those skipped."""
    candidates: list[Candidate] = []
    skipped: list[SkippedFile] = []
    # Each item: (relative directory with trailing "/", its path, .gitignore specs from the root down).
    stack: list[tuple[str, str, GitIgnores]] = [("", root, ())]
    while stack:
        rel_dir, path, gitignores = stack.pop()
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        if _is_codetune_output(path, entries):
            skipped.append(SkippedFile(rel_dir or "./", SKIP_CODETUNE_OUTPUT))
            continue
        gitignores += _gitignore_in(rel_dir, entries)
        for entry in entries:
            rel_path = rel_dir + entry.name
            if entry.is_symlink():
                target = _resolve(entry.path)
                is_dir = target is not None and os.path.isdir(target)
            else:
                target, is_dir = entry.path, entry.is_dir(follow_symlinks=False)
            if entry.name == ".git" or rules.is_ignored(rel_path, is_dir, gitignores):
                skipped.append(SkippedFile(rel_path + "/" if is_dir else rel_path, SKIP_IGNORED))
            elif is_dir and entry.is_symlink():
                skipped.append(SkippedFile(rel_path + "/", _dir_symlink_reason(root, path, target)))
            elif is_dir:
                stack.append((rel_path + "/", entry.path, gitignores))
            else:
                reason = _file_skip_reason(root, rel_path, extensions, entry, target)
                if reason is None:
                    candidates.append(Candidate(rel_path, target))
                else:
                    skipped.append(SkippedFile(rel_path, reason))
    return candidates, skipped


def _is_codetune_output(path: str, entries: list[os.DirEntry]) -> bool:
    """Whether the directory at `path` is something codetune wrote (see the module docstring)."""
    for entry in entries:
        key = CODETUNE_OUTPUT_MARKERS.get(entry.name)
        if key is not None and entry.is_file(follow_symlinks=False) and _json_has_key(entry.path, key):
            return True
    return os.path.basename(path) == TOKEN_CACHE_DIR and bool(entries) and all(
        _TOKEN_CACHE_ENTRY.fullmatch(e.name) and e.is_dir(follow_symlinks=False) for e in entries)


def _json_has_key(path: str, key: str) -> bool:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # a file of the user's that has the marker's name; not codetune's
    return isinstance(data, dict) and key in data


def _gitignore_in(rel_dir: str, entries: list[os.DirEntry]) -> GitIgnores:
    """The `.gitignore` of one directory as a (relative directory, spec) layer, if it has one."""
    for entry in entries:
        # Like git (>= 2.32), a symlinked .gitignore is not followed.
        if entry.name == ".gitignore" and entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                # surrogateescape keeps non-UTF-8 bytes matching os.scandir's file names.
                lines = f.read().decode("utf-8", errors="surrogateescape").splitlines()
            return ((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)),)
    return ()


def _resolve(path: str) -> str | None:
    """Real path of a symlink, or None when it dangles or loops."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError:  # FileNotFoundError (dangling) or ELOOP (loop): both mean "no target"
        return None


def _is_inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _dir_symlink_reason(root: str, link_dir: str, target: str) -> str:
    """Why a directory symlink is not descended: it leaves the repo or loops, or duplicates a walked dir."""
    loops = _is_inside(target, link_dir)
    return SKIP_SYMLINK if loops or not _is_inside(root, target) else SKIP_DUPLICATE


def _file_skip_reason(
    root: str, rel_path: str, extensions: frozenset[str], entry: os.DirEntry, target: str | None
) -> str | None:
    """Name-level checks of a file (or file symlink) found by the walk; None means "read it"."""
    if is_secret_file(rel_path):
        return SKIP_SECRET_FILE
    if os.path.splitext(rel_path)[1].lower() not in extensions:
        return SKIP_EXTENSION
    if not entry.is_symlink():
        # Sockets, FIFOs and devices: opening a FIFO would block forever.
        return None if entry.is_file(follow_symlinks=False) else SKIP_BINARY
    if target is None or not _is_inside(root, target):
        return SKIP_SYMLINK
    target_rel = os.path.relpath(target, root).replace(os.sep, "/")
    if is_secret_file(target_rel):
        return SKIP_SECRET_FILE
    if target_rel == ".git" or target_rel.startswith(".git/"):
        return SKIP_IGNORED
    return None if os.path.isfile(target) else SKIP_BINARY
