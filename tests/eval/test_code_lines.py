"""Prose lines (comments, docstrings) told from code lines by the parse."""

from __future__ import annotations

import textwrap

from codetune.eval.code_lines import prose_lines

PYTHON = textwrap.dedent('''\
    def load(path):
        """Read it.

        Twice.
        """
        # a comment
        x = f(path)  # code with a comment
        query = """
        SELECT 1
        """
        return x
    ''')

RUST = textwrap.dedent('''\
    /// Adds.
    pub fn add(a: i32) -> i32 {
        // note
        let s = "text";
        /* block */
        a + 1
    }
    ''')


def test_python_docstrings_and_comments_are_prose_and_code_lines_are_not():
    # The docstring (its blank line is neither), the comment, and the inside and end of a string given a name.
    assert prose_lines(PYTHON, "python") == {1, 3, 4, 5, 8, 9}


def test_rust_comments_are_prose():
    assert prose_lines(RUST, "rust") == {0, 2, 4}


def test_a_language_without_a_grammar_cannot_tell():
    assert prose_lines("# Title\n\nText.\n", "markdown") is None
