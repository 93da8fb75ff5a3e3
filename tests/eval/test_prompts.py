"""Prompts cut from held-out files at function and item starts."""

from __future__ import annotations

import textwrap

import pytest

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


def test_prefix_ends_with_the_boundary_line_and_the_continuation_is_the_truth():
    prompts = repo_prompts([("src/lib.rs", "rust", RUST)], max_prompts=100, min_prefix_lines=0, max_per_file=100)
    assert len(prompts) == 14
    for p in prompts:
        boundary = RUST.split("\n")[p.line - 1]
        assert p.prefix.endswith(boundary + "\n")
        assert RUST.startswith(p.head + p.prefix + p.continuation)
        assert p.head == "" and p.continuation.strip()
    helper = next(p for p in prompts if p.prefix.endswith("pub(crate) fn helper() -> i32 {\n"))
    assert helper.line == 16 and helper.continuation.startswith("    let fn_count = 1;\n")


def test_a_docstring_and_comments_after_the_signature_stay_in_the_prompt():
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
    [p] = repo_prompts([("a.py", "python", text)], max_prompts=1, min_prefix_lines=2)
    # The next line to write is the first line of code: what a docstring says is prose, no test of writing code.
    assert p.prefix.endswith("    # Opened once.\n") and p.continuation.startswith("    with open(path) as f:\n")
    assert p.line == 10 and p.head + p.prefix + p.continuation == text
    # Without a grammar nothing is known to be prose: the cut stays at the boundary.
    [md] = repo_prompts([("a.md", "markdown", "# T\n\nOne.\n\nTwo\nthree.\n")], max_prompts=1, min_prefix_lines=2)
    assert md.prefix.endswith("Two\n") and md.line == 5


def test_continuation_is_bounded_in_lines_then_chars():
    text = "fn a() {\n" * 6 + "".join(f"    let v{i} = {i};\n" for i in range(50))
    [p] = repo_prompts([("a.rs", "rust", text)], max_prompts=1, min_prefix_lines=5, max_per_file=1,
                       max_continuation_lines=10, max_continuation_chars=10_000)
    assert p.line == 6 and p.continuation.count("\n") == 10
    [p] = repo_prompts([("a.rs", "rust", text)], max_prompts=1, min_prefix_lines=5, max_per_file=1,
                       max_continuation_lines=10, max_continuation_chars=40)
    assert p.continuation == "    let v0 = 0;\n    let v1 = 1;\n"  # whole lines only
    [p] = repo_prompts([("a.rs", "rust", text)], max_prompts=1, min_prefix_lines=5, max_per_file=1,
                       max_continuation_chars=5)
    assert p.continuation == "    l"  # not even one line fits: hard cut


def test_long_prefix_is_cut_at_a_line_start_and_kept_in_head():
    filler = "".join(f"const C{i}: u32 = {i};\n" for i in range(100))
    text = filler + "fn f() -> u32 {\n    C1 + C2\n}\n"
    [p] = repo_prompts([("a.rs", "rust", text)], max_prompts=5, max_prefix_chars=200, min_prefix_lines=3)
    assert len(p.prefix) <= 200 and p.prefix.startswith("const C")
    assert len(p.head.splitlines(keepends=True)[-1] + p.prefix) > 200  # as many whole lines as fit
    assert p.head + p.prefix == filler + "fn f() -> u32 {\n"
    assert p.program("\n    C1 + C2\n}\n") == text


def test_too_little_prefix_and_nothing_after_are_skipped():
    text = "fn a() {}\nfn b() {}\nfn c() {}\nfn d() {\n    1\n}\nfn e() {}\n\n\nfn last() {}"
    prompts = repo_prompts([("a.rs", "rust", text)], max_prompts=10, min_prefix_lines=2, max_per_file=10,
                           max_continuation_lines=2)
    # a, b: fewer than 2 lines before; e: only blank lines in its 2-line continuation; last: nothing follows.
    assert [p.line for p in prompts] == [3, 4]


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
    assert len(prompts) == 18
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
    next line, not the rest of the signature's (`  # pragma: no cover`)."""
    text = "import os\n\n\ndef f():\n    return 1\n"
    [p] = repo_prompts([("a.py", "python", text)], max_prompts=1, min_prefix_lines=2, style="after")
    assert p.model_input == "import os\n\n\ndef f():\n" and p.program("    return 1\n") == text
    [before] = repo_prompts([("a.py", "python", text)], max_prompts=1, min_prefix_lines=2)
    assert before.model_input == "import os\n\n\ndef f():"
