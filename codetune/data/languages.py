"""A repository's language mix and the config it calls for.

`language_table` sums files, lines, bytes and (when token counts are given) tokens per language over
the files a scan kept. `recommend_config` applies the rule users know from the two configs: when
more than 70% of the *code* lines are Rust, the config named `rust` (`configs/training_config_rust.yaml`:
longer windows, rank 16); otherwise `default` (`configs/training_config.yaml`). These are the short names
`--config` takes from any directory (the configs ship with the package).

"Code" means programming languages: prose and data files (`NON_CODE_LANGUAGES`: Markdown, reST,
plain text, JSON, YAML, TOML) are listed and trained on but left out of the share, because a crate
with a long README or a big `Cargo.toml` is still a Rust crate. Exactly 70% is not "more than 70%",
and a repository without code gets the default config. Training refuses such a repository outright
(`no_code_problem`): a code model fine-tuned on a README learns nothing about the user's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from codetune.data.files import LANGUAGE_BY_EXTENSION, SourceFile

NON_CODE_LANGUAGES = frozenset({"markdown", "restructuredtext", "text", "json", "yaml", "toml"})
RUST_SHARE_THRESHOLD = 0.70
DEFAULT_CONFIG = "default"
RUST_CONFIG = "rust"
# Files named in the message of `no_code_problem` (the count says how many there are in all).
FILES_NAMED = 5


@dataclass(frozen=True)
class LanguageRow:
    """Totals of one language over the kept files."""

    language: str
    files: int
    lines: int
    bytes: int
    tokens: int | None
    """Token count under the tokenizer used, or None when tokens were not counted."""
    is_code: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recommendation:
    config: str
    rust_share: float
    """Rust lines / code lines (0.0 when there is no code)."""
    reason: str


def language_table(files: Sequence[SourceFile], token_counts: Sequence[int] | None = None) -> list[LanguageRow]:
    """One row per language, most lines first (ties by name); `token_counts[i]` belongs to `files[i]`."""
    if token_counts is not None and len(token_counts) != len(files):
        raise ValueError(f"{len(token_counts)} token counts for {len(files)} files")
    totals: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        row = totals.setdefault(f.language, [0, 0, 0, 0])
        row[0] += 1
        row[1] += f.n_lines
        row[2] += len(f.text.encode("utf-8"))
        row[3] += token_counts[i] if token_counts is not None else 0
    rows = [
        LanguageRow(lang, n_files, lines, n_bytes, tokens if token_counts is not None else None,
                    is_code(lang))
        for lang, (n_files, lines, n_bytes, tokens) in totals.items()
    ]
    return sorted(rows, key=lambda r: (-r.lines, r.language))


def rust_share(rows: Sequence[LanguageRow]) -> float:
    """Share of code lines that are Rust; 0.0 when the rows hold no code."""
    code_lines = sum(r.lines for r in rows if r.is_code)
    rust_lines = sum(r.lines for r in rows if r.language == "rust")
    return rust_lines / code_lines if code_lines else 0.0


def recommend_config(rows: Sequence[LanguageRow]) -> Recommendation:
    """The config for a repository with these language totals (see the module docstring for the rule)."""
    share = rust_share(rows)
    if not any(r.is_code for r in rows):
        return Recommendation(DEFAULT_CONFIG, share, "no code files were kept, so the default applies")
    if share > RUST_SHARE_THRESHOLD:
        return Recommendation(RUST_CONFIG, share, f"{share:.1%} of code lines are Rust (more than 70%)")
    return Recommendation(DEFAULT_CONFIG, share, f"{share:.1%} of code lines are Rust (70% or less)")


def is_code(language: str) -> bool:
    """Whether `language` (a value of `LANGUAGE_BY_EXTENSION`) is a programming language, not prose or data."""
    return language not in NON_CODE_LANGUAGES


def code_extensions(extensions: Sequence[str]) -> list[str]:
    """Those of `extensions` (known, dotted) whose language is a programming language, in their order."""
    return [ext for ext in extensions if is_code(LANGUAGE_BY_EXTENSION[ext.lower()])]


def no_code_problem(files: Sequence[SourceFile]) -> str | None:
    """None when a kept file is in a programming language; otherwise what the scan kept, e.g. "the scan kept 1
    file, README.md (markdown), and none in a programming language" (the first `FILES_NAMED` files, in scan order)."""
    if any(is_code(f.language) for f in files):
        return None
    if not files:
        return "the scan kept no file"
    named = [f"{f.rel_path} ({f.language})" for f in files[:FILES_NAMED]]
    if len(files) > FILES_NAMED:
        named.append(f"{len(files) - FILES_NAMED} more")
    count = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    return f"the scan kept {count}, {', '.join(named)}, and none in a programming language"
