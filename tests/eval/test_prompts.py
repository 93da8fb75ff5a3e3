"""Prompts cut from held-out files before code lines (paragraph starts without a grammar), and boundary lines."""

from __future__ import annotations

import textwrap

import pytest

from codetune.eval.code_lines import prose_lines
from codetune.eval.metrics import syntax_valid
from codetune.eval.prompts import RepoPrompt, boundary_lines, repo_prompts

RUST = textwrap.dedent('''\
    //! Crate docs.
    #![allow(dead_code)]
    use std::fmt;

    #[derive(Debug)]
    pub struct Point {
        x: i32,
    }

    struct Inner;
    enum Kind { A, B }
    pub enum Shape { Dot }
    trait Area { fn area(&self) -> f64; }
    pub trait Named {}
    mod tests {}
    pub(crate) fn helper() -> i32 {
        let fn_count = 1;
        // fn in a comment
        implement(fn_count)
    }

    impl fmt::Display for Point {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "{}", self.x)
        }
    }

    impl<T> Wrapper<T> {
        pub async fn run(&self) {}
        pub const fn size() -> usize { 0 }
    }
''')

PYTHON = textwrap.dedent('''\
    import os
    define = 1
    classes = []


    @dataclass
    class Store:
        # def in a comment
        async def load(self):
            return await fetch()

        def get(self, key):
            return self.values[key]
''')


def lines_of(text: str, indices: list[int]) -> list[str]:
    lines = text.split("\n")
    return [lines[i].strip() for i in indices]


def test_rust_boundaries_are_item_and_attribute_line_starts():
    assert lines_of(RUST, boundary_lines(RUST, "rust")) == [
        "#[derive(Debug)]", "pub struct Point {", "struct Inner;", "enum Kind { A, B }", "pub enum Shape { Dot }",
        "trait Area { fn area(&self) -> f64; }", "pub trait Named {}", "mod tests {}",
        "pub(crate) fn helper() -> i32 {", "impl fmt::Display for Point {",
        "fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {", "impl<T> Wrapper<T> {",
        "pub async fn run(&self) {}", "pub const fn size() -> usize { 0 }"]


def test_python_boundaries_are_defs_classes_and_decorators():
    assert lines_of(PYTHON, boundary_lines(PYTHON, "python")) == [
        "@dataclass", "class Store:", "async def load(self):", "def get(self, key):"]


def test_other_languages_cut_at_paragraph_starts():
    text = "# Title\n\nFirst paragraph\ngoes on.\n\n\nSecond.\n"
    assert lines_of(text, boundary_lines(text, "markdown")) == ["First paragraph", "Second."]


def test_the_truth_starts_with_a_code_line_and_the_prefix_ends_with_the_line_before():
    prompts = repo_prompts([("src/lib.rs", "rust", RUST)], max_prompts=100, min_prefix_lines=0, max_per_file=100)
    lines = RUST.split("\n")
    # Every code line of 8+ characters but the first line; not `x: i32,` (6), `}` or `// fn in a comment` (17, 24).
    assert [p.line for p in prompts] == [1, 2, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 18, 21, 22, 23, 27, 28, 29]
    prose = prose_lines(RUST, "rust")
    for p in prompts:
        truth = lines[p.line]  # `line` is 1-based: it indexes the next line
        assert p.prefix.endswith(lines[p.line - 1] + "\n") and p.continuation.startswith(truth + "\n")
        assert len(truth.strip()) >= 8 and p.line not in prose
        assert RUST.startswith(p.head + p.prefix + p.continuation) and p.head == ""
    # A prompt ends anywhere in a body, not only after a signature: here after a comment, before the last line.
    inner = next(p for p in prompts if p.line == 18)
    assert inner.prefix.endswith("    // fn in a comment\n") and inner.continuation.startswith("    implement(fn_count)\n")


def test_docstrings_and_comments_are_context_never_the_truth():
    text = textwrap.dedent('''\
        import os


        def load(path):
            """Read it.

            All of it.
            """

            # Opened once.
            with open(path) as f:
                return f.read()
        ''')
    prompts = repo_prompts([("a.py", "python", text)], max_prompts=10, min_prefix_lines=2, max_per_file=10)
    assert [(p.line, p.continuation.split("\n")[0]) for p in prompts] == [
        (3, "def load(path):"), (10, "    with open(path) as f:"), (11, "        return f.read()")]
    assert prompts[1].prefix.endswith("    # Opened once.\n")
    assert all(p.head + p.prefix + p.continuation == text for p in prompts)


def test_without_a_grammar_a_prompt_ends_with_a_paragraphs_first_line():
    text = "# T\n\nOne.\n\nTwo\nthree.\n"
    prompts = repo_prompts([("a.md", "markdown", text)], max_prompts=10, min_prefix_lines=2, max_per_file=10)
    assert [(p.line, p.prefix.split("\n")[-2]) for p in prompts] == [(3, "One."), (5, "Two")]
    assert prompts[1].continuation == "three.\n"


def test_continuation_is_bounded_in_lines_then_chars():
    text = "fn main() {\n" + "".join(f"    let v{i} = {i};\n" for i in range(50)) + "}\n"
    lines = text.splitlines(keepends=True)
    prompts = repo_prompts([("a.rs", "rust", text)], max_prompts=100, min_prefix_lines=5, max_per_file=100,
                           max_continuation_lines=10, max_continuation_chars=10_000)
    # Lines 6..50 (0-based) are truths: 5 lines before each prompt's last one; `}` is too short to be one.
    assert [p.line for p in prompts] == list(range(6, 51))
    assert all(p.continuation == "".join(lines[p.line : p.line + 10]) for p in prompts)
    assert prompts[0].continuation.count("\n") == 10 and prompts[-1].continuation == "    let v49 = 49;\n}\n"
    prompts = repo_prompts([("a.rs", "rust", text)], max_prompts=100, min_prefix_lines=5, max_per_file=100,
                           max_continuation_lines=10, max_continuation_chars=40)
    assert prompts[0].continuation == "    let v5 = 5;\n    let v6 = 6;\n"  # whole lines only
    [p] = repo_prompts([("a.rs", "rust", text)], max_prompts=1, min_prefix_lines=5, max_continuation_chars=5)
    assert p.continuation == "    l"  # not even one line fits: hard cut


def test_long_prefix_is_cut_at_a_line_start_and_kept_in_head():
    filler = "".join(f"const C{i}: u32 = {i};\n" for i in range(100))
    text = filler + "fn f() -> u32 {\n    C1 + C2 + C3\n}\n"
    lines = text.splitlines(keepends=True)
    prompts = repo_prompts([("a.rs", "rust", text)], max_prompts=200, max_prefix_chars=200, min_prefix_lines=3,
                           max_per_file=200)
    assert [p.line for p in prompts] == list(range(4, 102))
    for p in prompts:
        assert len(p.prefix) <= 200 and p.head + p.prefix == "".join(lines[: p.line])
        assert not p.head or len(p.head.splitlines(keepends=True)[-1] + p.prefix) > 200  # as many lines as fit
    body = prompts[-1]
    assert body.prefix.startswith("const C") and body.head + body.prefix == filler + "fn f() -> u32 {\n"
    assert body.program("\n    C1 + C2 + C3\n}\n") == text


def test_too_little_prefix_a_blank_continuation_and_nothing_after_are_skipped():
    text = "use std::io;\nuse std::fs;\nuse std::env;\nuse std::fmt;\n"
    prompts = repo_prompts([("a.rs", "rust", text)], max_prompts=10, min_prefix_lines=2, max_per_file=10)
    assert [p.line for p in prompts] == [3]  # fs, env: fewer than 2 lines before the prompt's last one
    indented = "fn main() {\n    let a = 1;\n    let b = 2;\n    let x = 1;\n            call_it();\n}\n"
    prompts = repo_prompts([("a.rs", "rust", indented)], max_prompts=10, min_prefix_lines=2, max_per_file=10,
                           max_continuation_chars=8)
    assert [p.continuation for p in prompts] == ["    let "]  # `call_it();` hard-cut to its 8 blanks is skipped
    text = "# T\n\nOne.\n\nTwo\n\n\n\nThree\n\nlast"
    prompts = repo_prompts([("a.md", "markdown", text)], max_prompts=10, min_prefix_lines=2, max_per_file=10,
                           max_continuation_lines=2)
    # Two: only blank lines in its 2-line continuation; last: nothing follows.
    assert [p.line for p in prompts] == [3, 9]


def test_selection_is_deterministic_bounded_and_spread_over_files():
    files = [(f"src/m{i}.rs", "rust", RUST) for i in range(6)]
    prompts = repo_prompts(files, max_prompts=6, min_prefix_lines=2, max_per_file=3)
    assert len({p.path for p in prompts}) == 6  # one per file before any file gets a second
    assert prompts == sorted(prompts, key=lambda p: (p.path, p.line))
    assert prompts == repo_prompts(list(reversed(files)), max_prompts=6, min_prefix_lines=2, max_per_file=3)
    many = repo_prompts(files, max_prompts=100, min_prefix_lines=2, max_per_file=3)
    assert len(many) == 18
    assert {p.line for p in repo_prompts(files, 100, 2, seed=1)} != {p.line for p in many}
    # With fewer prompts than files, the seed (not the alphabet) decides which files are used.
    chosen = {tuple(p.path for p in repo_prompts(files, max_prompts=2, seed=seed)) for seed in range(5)}
    assert len(chosen) > 1


def test_a_files_choices_do_not_depend_on_other_files():
    alone = repo_prompts([("a.rs", "rust", RUST)], max_prompts=100, max_per_file=3)
    together = repo_prompts([("a.rs", "rust", RUST), ("b.rs", "rust", RUST)], max_prompts=100, max_per_file=3)
    assert [p for p in together if p.path == "a.rs"] == alone


def test_the_true_continuation_is_syntax_valid_as_a_cut_program():
    files = [("src/lib.rs", "rust", RUST), ("store.py", "python", PYTHON)]
    prompts = repo_prompts(files, max_prompts=100, min_prefix_lines=0, max_per_file=100, max_continuation_lines=3)
    assert len(prompts) == 19 + 8  # every code line of 8+ characters but the first line
    assert all(syntax_valid(p.program("\n" + p.continuation), p.language) for p in prompts)


def test_bad_arguments_are_all_reported_at_once():
    with pytest.raises(ValueError) as info:
        repo_prompts([("a.rs", "rust", RUST), ("a.rs", "rust", "")], max_prompts=0, min_prefix_lines=-1,
                     max_per_file=0)
    message = str(info.value)
    for expected in ("max_prompts must be positive, got 0", "min_prefix_lines", "max_per_file",
                     "paths repeat: ['a.rs']"):
        assert expected in message


def test_the_model_input_leaves_the_boundary_line_break_to_the_model():
    p = RepoPrompt("a.py", "python", "def f():\n", "    return 1\n", 1, "")
    assert p.model_input == "def f():" and p.program("\n    pass\n") == "def f():\n    pass\n"


def test_a_tokenizer_that_cuts_after_the_line_break_gets_it_in_the_prompt():
    """Qwen's tokens break after a newline: the prompt ends where the user pressed Enter, and the model writes the
    next line, not the rest of the previous one (`  # pragma: no cover`)."""
    text = "import os\n\n\ndef f():\n    return 1\n"
    after = repo_prompts([("a.py", "python", text)], max_prompts=2, min_prefix_lines=2, style="after")
    assert [p.line for p in after] == [3, 4]
    assert after[1].model_input == "import os\n\n\ndef f():\n" and after[1].program("    return 1\n") == text
    before = repo_prompts([("a.py", "python", text)], max_prompts=2, min_prefix_lines=2)
    assert before[1].model_input == "import os\n\n\ndef f():" and before[0].model_input == "import os\n\n"
