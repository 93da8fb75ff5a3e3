"""The embedded model's corpus: permissively licensed Rust and Python sources from Debian packages.

Rust comes from the `librust-*-dev` crates under /usr/share/cargo/registry, Python from the installed
`python3-*` packages. A file is taken only when the licence its package's `debian/copyright` gives it is MIT,
Apache-2.0 or BSD, file by file (the stanza DEP-5 applies to each file; any alternative of an "or" will do; a
copyright file that is not machine-readable admits nothing).
Code reserved for evaluation never enters it: the tokio crates (tokio, tokio-util, tokio-macros, ...), the
`requests` package, any copy of either vendored inside another package (a directory named `requests` or
`tokio`, as pip's `pip/_vendor/requests/`), and codetune itself (not a Debian package).

Each package contributes at most `per_package_bytes` of source (files in a seeded order), so a few huge
packages do not drown the others; the files are copied under `corpus/<language>/<package>/...` with a
`corpus.json` recording package, version, licence, files and bytes.
"""

from __future__ import annotations

import fnmatch
import json
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codetune.storage import atomic_write_text

CARGO_REGISTRY = Path("/usr/share/cargo/registry")
DOC = Path("/usr/share/doc")
PYTHON_DIST = "/usr/lib/python3/dist-packages/"
ALLOWED = re.compile(r"^(mit|expat|apache-2(\.0)?|bsd(-[0-9](-clause)?)?)$")
RESERVED_CRATE = re.compile(r"^tokio($|[-_])")
RESERVED_PYTHON = {"python3-requests"}
# Vendored copies count too: pip ships requests as pip/_vendor/requests/.
RESERVED_DIRS = {"requests", "tokio"}


@dataclass
class Package:
    name: str
    language: str
    version: str
    licence: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def stanzas(copyright_text: str) -> list[tuple[list[str], str]]:
    """(file patterns, licence short name) of each `Files:` stanza of a DEP-5 copyright file ([]: not DEP-5)."""
    if "Format:" not in copyright_text.split("\n\n", 1)[0]:
        return []
    out = []
    for stanza in copyright_text.split("\n\n"):
        files = re.search(r"^Files:((?:.*\n?)(?:[ \t].*\n?)*)", stanza, re.M)
        name = re.search(r"^License:\s*(.*)$", stanza, re.M)
        if files and name:
            out.append((files.group(1).split(), name.group(1).strip()))
    return out


def licence_of(rel_path: str, file_stanzas: list[tuple[list[str], str]]) -> str | None:
    """The licence DEP-5 gives `rel_path` (the last stanza that matches wins); None when none matches.

    Debian's patterns name the upstream tree, which may keep the code under `src/` or `lib/`; an installed
    Python file is matched with and without that prefix."""
    found = None
    for patterns, name in file_stanzas:
        for pattern in patterns:
            bare = re.sub(r"^(src|lib)/", "", pattern)
            if fnmatch.fnmatchcase(rel_path, pattern) or fnmatch.fnmatchcase(rel_path, bare):
                found = name
    return found


def permissive(expression: str | None) -> bool:
    """True when the licence expression allows the code under MIT, Apache-2.0 or BSD terms."""
    if not expression:
        return False
    expression = expression.replace("(", " ").replace(")", " ")
    if re.search(r"\bor\b", expression, re.I):
        return any(permissive(alt) for alt in re.split(r"\bor\b", expression, flags=re.I))
    parts = [p.strip().lower() for p in re.split(r"\band\b|,|/", expression, flags=re.I) if p.strip()]
    return bool(parts) and all(ALLOWED.match(p) for p in parts)


def copyright_of(package: str) -> str | None:
    path = DOC / package / "copyright"
    return path.read_text(errors="replace") if path.is_file() else None


def rust_candidates() -> list[tuple[str, str, str, list[Path]]]:
    """(debian package, crate, version, .rs files) of every crate in the registry but the reserved ones."""
    out = []
    for crate_dir in sorted(CARGO_REGISTRY.iterdir()):
        crate, _, version = crate_dir.name.rpartition("-")
        if not crate or RESERVED_CRATE.match(crate):
            continue
        files = [p for p in crate_dir.rglob("*.rs") if "debian" not in p.relative_to(crate_dir).parts]
        out.append((f"librust-{crate.replace('_', '-').lower()}-dev", crate, version, files))
    return out


def python_candidates() -> list[tuple[str, str, str, list[Path]]]:
    """(debian package, package, version, .py files) of every installed python3-* package but the reserved."""
    listing = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "python3-*"],
                             capture_output=True, text=True).stdout
    out = []
    for line in sorted(listing.splitlines()):
        package, _, version = line.partition(" ")
        if not version or package in RESERVED_PYTHON:  # listed by dpkg but not installed: no version
            continue
        paths = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True).stdout.splitlines()
        files = [Path(p) for p in paths if p.startswith(PYTHON_DIST) and p.endswith(".py") and Path(p).is_file()]
        if files:
            out.append((package, package.removeprefix("python3-"), version, files))
    return out


def root_of(language: str, files: list[Path]) -> Path:
    """The directory the package's files are copied relative to: the crate, or dist-packages."""
    return files[0].parents[len(files[0].relative_to(CARGO_REGISTRY).parts) - 2] if language == "rust" \
        else Path(PYTHON_DIST)


def take(language: str, candidate, out_dir: Path, per_package_bytes: int, seed: int) -> Package | None:
    """Copy the permissively licensed files of one package, up to `per_package_bytes`, in a seeded order."""
    package, name, version, files = candidate
    text = copyright_of(package)
    file_stanzas = stanzas(text) if text else []
    root = root_of(language, files)
    record = Package(package, language, version, "")
    names = set()
    for path in sorted(files, key=lambda p: random.Random(f"{seed}:{p}").random()):
        rel = path.relative_to(root)
        if RESERVED_DIRS & set(rel.parts[:-1]):
            continue
        licence = licence_of(str(rel), file_stanzas)
        size = path.stat().st_size
        if not permissive(licence) or record.bytes + size > per_package_bytes:
            continue
        target = out_dir / language / name / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        record.files.append(str(target.relative_to(out_dir)))
        record.bytes += size
        names.add(licence)
    record.licence = " ; ".join(sorted(names))
    return record if record.files else None


def build_corpus(out_dir: Path, per_package_bytes: int = 200_000, seed: int = 0) -> dict:
    """Copy the corpus into `out_dir` (replaced) and write `out_dir/corpus.json`; returns what it records."""
    if not CARGO_REGISTRY.is_dir():
        raise SystemExit(f"no crates under {CARGO_REGISTRY}: apt-get install the librust-*-dev packages "
                         f"listed in bench/embedded/packages.txt first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    taken, refused = [], []
    for language, candidates in (("rust", rust_candidates()), ("python", python_candidates())):
        for candidate in candidates:
            record = take(language, candidate, out_dir, per_package_bytes, seed)
            (taken if record else refused).append(asdict(record) if record else candidate[0])
    summary = {"packages": taken, "refused_or_empty": refused, "per_package_bytes": per_package_bytes,
               "reserved": ["the tokio crates (tokio*)", "python3-requests", "vendored requests/ and tokio/ directories",
                            "codetune"]}
    atomic_write_text(out_dir / "corpus.json", json.dumps(summary, indent=1))
    return summary
