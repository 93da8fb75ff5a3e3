"""The language table and the 70%-Rust rule that picks a config."""

from __future__ import annotations

import pytest

from codetune.data.files import SourceFile
from codetune.data.languages import (DEFAULT_CONFIG, RUST_CONFIG, LanguageRow, language_table, recommend_config,
                                     rust_share)


def source(path: str, language: str, n_lines: int) -> SourceFile:
    text = "x\n" * n_lines
    return SourceFile(path, language, text, "0" * 64, n_lines)


def row(language: str, lines: int, is_code: bool = True) -> LanguageRow:
    return LanguageRow(language, 1, lines, 0, None, is_code)


def test_table_sums_per_language_most_lines_first():
    files = [source("a.rs", "rust", 10), source("b.py", "python", 30), source("c.rs", "rust", 5),
             source("README.md", "markdown", 100)]
    rows = language_table(files, token_counts=[7, 20, 3, 50])
    assert [(r.language, r.files, r.lines, r.tokens, r.is_code) for r in rows] == [
        ("markdown", 1, 100, 50, False), ("python", 1, 30, 20, True), ("rust", 2, 15, 10, True)]
    assert rows[2].bytes == 30
    assert all(r.tokens is None for r in language_table(files))
    with pytest.raises(ValueError, match="3 token counts for 4 files"):
        language_table(files, [1, 2, 3])


@pytest.mark.parametrize(("rust", "python", "expected"), [
    (71, 29, RUST_CONFIG),
    (70, 30, DEFAULT_CONFIG),  # exactly 70% is not "more than 70%"
    (69, 31, DEFAULT_CONFIG),
    (100, 0, RUST_CONFIG),
    (0, 100, DEFAULT_CONFIG),
])
def test_rule_is_more_than_70_percent_rust(rust, python, expected):
    rows = [row("rust", rust), row("python", python)]
    assert recommend_config(rows).config == expected
    assert rust_share(rows) == pytest.approx(rust / 100)


def test_docs_and_data_do_not_dilute_the_share():
    """A crate with a long README and Cargo.toml is still a Rust crate."""
    rows = [row("rust", 800), row("python", 200), row("markdown", 5000, False), row("toml", 900, False)]
    advice = recommend_config(rows)
    assert advice.config == RUST_CONFIG and advice.rust_share == pytest.approx(0.8)
    assert "80.0% of code lines are Rust" in advice.reason


def test_no_code_gets_the_default_and_says_why():
    advice = recommend_config([row("markdown", 50, False)])
    assert advice.config == DEFAULT_CONFIG and advice.rust_share == 0.0
    assert "no code" in advice.reason
    assert recommend_config([]).config == DEFAULT_CONFIG
