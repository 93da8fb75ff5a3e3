"""FIM prompts masked in held-out files (lines and function bodies, both cut styles) and their scores."""

from __future__ import annotations

import textwrap

import pytest

from codetune.eval.fim import (FimPrompt, fim_chrf, fim_exact_match, fim_prompts, fim_syntax_valid,
                               generated_middle, holds_middle)
from helpers import PY_FILE, RUST_FILE

PYTHON = textwrap.dedent('''\
    import os


    def load(path):
        """Read it."""
        with open(path) as f:
            return f.read()


    class Store:
        def get(self, key):
            return self.values[key]
    ''')

STYLES = ("after", "before")


def _files() -> list[tuple[str, str, str]]:
    return [("src/counter.rs", "rust", RUST_FILE), ("py/energy.py", "python", PY_FILE),
            ("py/store.py", "python", PYTHON), ("README.md", "markdown", "# Title\n\nSome prose here.\nMore prose.\n"),
            ("crlf.py", "python", PYTHON.replace("\n", "\r\n")), ("no_newline.py", "python", PYTHON.rstrip("\n"))]


def _all(files, style, **bounds) -> list[FimPrompt]:
    """Every mask of `files`: bounds high enough that the choice leaves nothing out."""
    return fim_prompts(files, 10_000, style=style, max_per_file=10_000, **bounds)


@pytest.mark.parametrize("style", STYLES)
def test_every_prompt_rebuilds_its_file_exactly(style):
    texts = {path: text for path, _, text in _files()}
    prompts = _all(_files(), style)
    # Every file has a prompt but the README, which has no block and no code line.
    assert {p.kind for p in prompts} == {"line", "block"} and {p.path for p in prompts} == texts.keys() - {"README.md"}
    for p in prompts:
        assert p.head + p.prefix + p.middle + p.suffix + p.tail == texts[p.path] == p.program(p.middle), p
        assert p.middle.strip() and p.prefix  # a mask is never blank, nor at the very start of a file


def test_masks_cut_after_the_line_break_or_before_it():
    lines = PYTHON.splitlines(keepends=True)
    after = {(p.kind, p.line): p for p in _all([("s.py", "python", PYTHON)], "after")}
    before = {(p.kind, p.line): p for p in _all([("s.py", "python", PYTHON)], "before")}
    # Code lines with at least 8 characters, not the first (`import os`) nor the last; never `}`-like stubs, nor
    # the docstring (line 5).
    assert sorted(line for kind, line in after if kind == "line") == [4, 6, 7, 10, 11]
    assert after.keys() == before.keys()
    # "after": the masked line with its newline; the prefix ends with the previous line's newline.
    assert after["line", 6].middle == lines[5] and after["line", 6].prefix.endswith(lines[4])
    # "before": the newline that precedes the line, without its own; the suffix starts with it.
    assert before["line", 6].middle == "\n" + lines[5].rstrip("\n")
    assert before["line", 6].prefix.endswith(lines[4].rstrip("\n")) and before["line", 6].suffix.startswith("\n    ")


def test_a_block_is_the_body_after_a_signature_line():
    lines = PYTHON.splitlines(keepends=True)
    blocks = {p.line: p for p in _all([("s.py", "python", PYTHON)], "after") if p.kind == "block"}
    # `def load`: its three body lines (the blank lines after it stay out); `class Store`: the method and its
    # body; `def get`: its one line.
    assert {line: p.lines for line, p in blocks.items()} == {5: 3, 11: 2, 12: 1}
    assert blocks[5].middle == "".join(lines[4:7]) and blocks[11].middle == "".join(lines[10:12])
    assert blocks[12].suffix == "" and blocks[12].tail == ""
    # A longer body masks its first lines only.
    short = {p.line: p for p in _all([("s.py", "python", PYTHON)], "before", max_block_lines=2) if p.kind == "block"}
    assert short[5].lines == 2 and short[5].middle == "\n" + "".join(lines[4:6]).rstrip("\n")
    # Rust: `#[derive]` is followed by an unindented line, so it has no block; `pub fn add` has three lines.
    rust = {p.line: p for p in _all([("c.rs", "rust", RUST_FILE)], "after") if p.kind == "block"}
    assert 4 not in rust and rust[14].middle == "".join(RUST_FILE.splitlines(keepends=True)[13:16])


def test_half_lines_half_blocks_and_lines_where_a_file_has_no_block():
    prompts = fim_prompts(_files()[:3], 6, seed=1)
    assert [p.kind for p in prompts].count("block") == 3 and len(prompts) == 6
    odd = fim_prompts(_files()[:3], 5)
    assert [p.kind for p in odd].count("block") == 2
    # Without a grammar, code cannot be told from prose: no line is masked.
    prose = [("notes.md", "markdown", "# Notes\n\nThe first paragraph line.\nIts second line here.\n\nEnd.\n")]
    assert fim_prompts(prose, 4) == []
    # Round-robin: the first of every file before the second of any; at most max_per_file of a kind per file.
    few = fim_prompts(_files(), 4)
    assert all(len({p.path for p in few if p.kind == kind}) == 2 for kind in ("line", "block"))
    one_each = fim_prompts(_files(), 12, max_per_file=1)
    # The README has neither a block nor a code line.
    assert len(one_each) == 5 + 5 == len({(p.path, p.kind) for p in one_each})


def test_the_choice_is_deterministic_and_stable_when_a_file_is_added():
    files = _files()
    chosen = fim_prompts(files, 8, seed=3)
    assert chosen == fim_prompts(files, 8, seed=3) and chosen != fim_prompts(files, 8, seed=4)
    assert chosen == fim_prompts(files[::-1], 8, seed=3)  # the order the files come in does not matter
    assert chosen == sorted(chosen, key=lambda p: (p.path, p.line, p.kind))
    took_slots = 0
    for name in ("py/extra.py", "a.py", "z/z.py", "lib/more.py"):
        added = (name, "python", PY_FILE.replace("Energy", "Extra"))
        grown = fim_prompts([added, *files], 8, seed=3)
        # The new file may take slots, but every other prompt chosen was chosen before: no file's choice moved.
        others = [p for p in grown if p.path != name]
        assert set(others) <= set(chosen) and len(grown) == 8
        took_slots += len(others) < len(grown)
        # With room for every file's share, the other files' prompts are exactly the same.
        assert set(fim_prompts(files, 100, seed=3)) < set(fim_prompts([*files, added], 100, seed=3))
    assert took_slots


@pytest.mark.parametrize("style", STYLES)
def test_prefix_and_suffix_are_bounded_at_line_cuts(style):
    long_file = "".join(f"value_{i:03d} = compute_{i:03d}()\n" for i in range(200))  # lines of one length
    texts = {"long.py": long_file, "py/energy.py": PY_FILE}
    files = [("long.py", "python", long_file), ("py/energy.py", "python", PY_FILE)]
    prompts = _all(files, style, max_prefix_chars=100, max_suffix_chars=50)
    for p in prompts:
        assert len(p.prefix) <= 100 and len(p.suffix) <= 50
        assert p.program(p.middle) == texts[p.path]
        # Whole lines: in "after" every piece starts at a line start, in "before" at a line break.
        if style == "after":
            assert not p.head or p.head.endswith("\n")
            assert not p.tail or (p.head + p.prefix + p.middle + p.suffix).endswith("\n")
        else:
            assert not p.head or p.prefix.startswith("\n")
            assert not p.tail or p.tail.startswith("\n")
    # The bound keeps as many lines as fit: one more line would pass it.
    line_len = len(long_file.splitlines(keepends=True)[0])
    deep = next(p for p in prompts if p.path == "long.py" and p.line == 100)
    assert len(deep.prefix) == (100 // line_len) * line_len and len(deep.suffix) == (50 // line_len) * line_len


def test_bad_arguments_are_named_together():
    with pytest.raises(ValueError, match=r"max_prompts must be positive.*\n.*style must be 'after' or 'before'"):
        fim_prompts([], 0, style="middle")
    with pytest.raises(ValueError, match="paths repeat"):
        fim_prompts([("a.py", "python", "x\n"), ("a.py", "python", "y\n")], 2)


# -- the generated middle and its scores ------------------------------------------------------------------


def test_the_generated_middle_is_cut_to_the_truths_lines():
    after, before = "    x = f(y)\n", "\n    x = f(y)"
    # "after": one line with its line break; what follows is the suffix's, not scored.
    assert not holds_middle("    x = f(", after) and generated_middle("    x = f(", after) == "    x = f("
    assert holds_middle("    x = 2\n    z = 3\n", after)
    assert generated_middle("    x = 2\n    z\n", after) == "    x = 2\n"
    # "before": the line is complete at the next line break, which belongs to the suffix and is left out.
    assert not holds_middle("\n    x = 2", before)
    assert holds_middle("\n    x = 2\n", before) and generated_middle("\n    x = 2\n    z\n", before) == "\n    x = 2"
    # Two masked lines need two lines; \r\n is one line break, as in str.splitlines.
    assert generated_middle("a\r\nb\r\nc\r\n", "    a\r\n    b\r\n") == "a\r\nb\r\n"


def _prompt(kind: str, middle: str, language: str = "python", prefix: str = "def f(x):\n",
            suffix: str = "    return x\n") -> FimPrompt:
    return FimPrompt("f.py", language, kind, 2, prefix, middle, suffix, len(middle.strip("\n").splitlines()))


def test_a_perfect_middle_scores_one_everywhere():
    prompts = [_prompt("line", "    x = x + 1\n"), _prompt("block", "    y = x * 2\n    x = y - 1\n"),
               _prompt("line", "\n    let y = x;", "rust", "fn f(x: u32) -> u32 {", "\n    y\n}\n")]
    middles = [p.middle for p in prompts]
    assert (fim_exact_match(prompts, middles), fim_chrf(prompts, middles), fim_syntax_valid(prompts, middles)) == (
        1.0, 1.0, 1.0)


def test_indentation_counts_and_trailing_whitespace_does_not():
    prompts = [_prompt("line", "    x = x + 1\n"), _prompt("line", "\n    x = x + 1", prefix="def f(x):",
                                                           suffix="\n    return x\n")]
    assert fim_exact_match(prompts, ["    x = x + 1   \n", "\n    x = x + 1  "]) == 1.0
    assert fim_exact_match(prompts, ["  x = x + 1\n", "\n    x = x + 1"]) == 0.5
    # A "before" middle must keep its leading line break: without it the line would join the previous one.
    assert fim_exact_match(prompts, ["    x = x + 1\n", "    x = x + 1"]) == 0.5
    assert fim_chrf(prompts, [p.middle for p in prompts]) is None  # no block mask


def test_a_broken_middle_is_not_syntax_valid_and_a_broken_file_is_not_counted():
    good, broken_file = _prompt("block", "    y = (x\n"), _prompt("line", "    x = 1\n", suffix="    return )\n")
    assert fim_syntax_valid([good], ["    y = (x\n"]) is None  # the file itself does not parse: not counted
    fine = _prompt("block", "    y = x\n    x = y\n")
    assert fim_syntax_valid([fine, broken_file], ["    y = (x\n    x = y\n", "    x = 1\n"]) == 0.0
    assert fim_syntax_valid([fine, broken_file], ["    y = x\n    x = y\n", "    x = 1\n"]) == 1.0
    # A language without a grammar is not counted either; the other scores still are.
    prose = _prompt("line", "More words here.\n", "markdown", "# Title\n", "End.\n")
    assert fim_syntax_valid([prose], [prose.middle]) is None and fim_exact_match([prose], [prose.middle]) == 1.0
    with pytest.raises(ValueError, match="1 middles for 2 prompts"):
        fim_chrf([fine, good], ["x"])


def test_a_wrong_block_lowers_chrf():
    block = _prompt("block", "    total = sum(values)\n    return total\n")
    assert fim_chrf([block], ["    count = len(items)\n    return count\n"]) < 0.5
    assert fim_chrf([block], [block.middle]) == 1.0
