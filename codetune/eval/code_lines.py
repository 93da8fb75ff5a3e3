"""Which lines of a file are prose (comments, docstrings) rather than code, by its tree-sitter parse.

The completion metrics score code: a masked line or a next line that is a comment or a docstring is prose, which
no model can be expected to match word for word, and which says nothing about whether it writes code like the
repository's. A line is *prose* when it is not blank and every one of its non-blank characters lies inside a
comment or string node (`# note`, a docstring's lines, `/// docs`, the inside of a multi-line string); a line with
any other character (`x = 1  # note`, `f('''`) is code. Only languages with a grammar
(`grammar_parser`, which the syntax check shares) can tell; for the others `prose_lines` returns None.

`code_line_indices` names the lines a completion metric asks for (a FIM line mask, the next line of a repo prompt):
code lines whose stripped text has at least `MIN_LINE_CHARS` characters, since a lone `}` or `else:` says little
about the model, never the file's first line, which has no code before it to continue.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from itertools import accumulate

import tree_sitter
import tree_sitter_python
import tree_sitter_rust

_GRAMMARS: dict[str, Callable[[], object]] = {
    "rust": tree_sitter_rust.language,
    "python": tree_sitter_python.language,
}

MIN_LINE_CHARS = 8
"""The fewest non-blank characters of a line worth asking a model to write."""

_PROSE_NODES = frozenset({
    "comment", "string",  # Python (a docstring is a string statement)
    "line_comment", "block_comment", "string_literal", "raw_string_literal",  # Rust
})


def prose_lines(text: str, language: str) -> frozenset[int] | None:
    """0-based indices of the prose lines of `text` (lines as `str.split("\\n")` counts them), or None without
    a grammar for `language`."""
    parser = grammar_parser(language)
    if parser is None:
        return None
    data = text.encode()
    covered = bytearray(len(data))
    for start, end in _prose_spans(parser.parse(data).root_node):
        covered[start:end] = b"\x01" * (end - start)
    lines = data.split(b"\n")
    starts = accumulate((len(line) + 1 for line in lines), initial=0)
    return frozenset(i for i, (line, start) in enumerate(zip(lines, starts))
                     if line.strip() and all(covered[start + k] or line[k:k + 1].isspace() for k in range(len(line))))


def code_line_indices(text: str, language: str) -> list[int] | None:
    """0-based indices, ascending, of the code lines of `text` worth completing (lines as `prose_lines` counts
    them), or None without a grammar for `language`."""
    prose = prose_lines(text, language)
    if prose is None:
        return None
    lines = text.split("\n")
    return [i for i in range(1, len(lines)) if len(lines[i].strip()) >= MIN_LINE_CHARS and i not in prose]


@cache
def grammar_parser(language: str) -> tree_sitter.Parser | None:
    """A tree-sitter parser for `language` (one per language, reused), or None when codetune has no grammar for it."""
    grammar = _GRAMMARS.get(language)
    return tree_sitter.Parser(tree_sitter.Language(grammar())) if grammar else None


def _prose_spans(node: tree_sitter.Node) -> list[tuple[int, int]]:
    """Byte spans of the comment and string nodes under `node`, outermost only."""
    spans, stack = [], [node]
    while stack:
        current = stack.pop()
        if current.type in _PROSE_NODES:
            spans.append((current.start_byte, current.end_byte))
        else:
            stack.extend(current.children)
    return spans
