"""Completion metrics (exact match, chrF, perplexity) and the syntax-validity rule for cut code."""

from __future__ import annotations

import math
import textwrap

import pytest
from torchmetrics.functional.text import chrf_score

from codetune.eval.metrics import (chrf, mean_next_line_exact_match, next_line_exact_match, perplexity_from_loss,
                                   syntax_valid, syntax_validity_rate)

RUST = textwrap.dedent('''\
    use std::collections::HashMap;

    /// Counts words.
    #[derive(Debug, Clone)]
    pub struct Counter<'a> {
        counts: HashMap<&'a str, usize>,
    }

    impl<'a> Counter<'a> {
        pub fn add(&mut self, word: &'a str) -> usize {
            let open = '{';
            let text = "a } string with ( brackets";
            let raw = r#"raw "quoted" ]"#;
            /* a block /* nested */ comment ( */
            let entry = self.counts.entry(word).or_insert(0);
            *entry += 1;
            let total: usize = self
                .counts
                .values()
                .map(|v| v * 2)
                .sum();
            let s = Summary {
                words: self.counts.len(),
                total,
            };
            match s.words {
                0 => println!("empty {}", open),
                n if n > 10 => {
                    println!("many: {} {}", n, text);
                }
                _ => {}
            }
            let multi = "line one
    line two (
    line three";
            if total > 3 && raw.len() > multi.len() {
                return total;
            } else {
                // a comment with { brace
                *entry
            }
        }
    }
''')

PYTHON = textwrap.dedent('''\
    import os


    class Store:
        """A store.

        With (brackets in a docstring.
        """

        def get(self, key: str, default=None):
            values = {
                "a": [1, 2, 3],
                'b': (4, 5),
            }
            text = "a ) string # not a comment"
            if key in values and len(text) > 3:  # comment (
                return values[key]
            elif key.startswith(("x", "y")):
                return sorted(
                    values,
                    key=lambda k: (len(k), k),
                )
            else:
                doc = """multi
    line ( string
    """
                return default
''')


# -- perplexity -------------------------------------------------------------------------------


def test_perplexity_is_exp_of_mean_token_nll():
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity_from_loss(1e6) == math.inf
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="mean_nll"):
            perplexity_from_loss(bad)


# -- next-line exact match --------------------------------------------------------------------


def test_next_line_compares_first_nonblank_lines_with_indentation():
    truth = "\n        let x = 1;\n        x\n"
    assert next_line_exact_match("        let x = 1;   \nsomething else", truth) == 1.0
    assert next_line_exact_match("\n\n        let x = 1;", truth) == 1.0
    assert next_line_exact_match("    let x = 1;", truth) == 0.0  # wrong depth is a different line
    assert next_line_exact_match("        let x = 2;", truth) == 0.0
    assert next_line_exact_match("", truth) == 0.0
    with pytest.raises(ValueError, match="no non-blank line"):
        next_line_exact_match("x", " \n\n")


def test_mean_next_line_is_the_fraction_of_matching_pairs():
    assert mean_next_line_exact_match(["a\n", "b\n", "c\n", "x\n"], ["a", "b", "c", "d"]) == 0.75
    with pytest.raises(ValueError, match="2 generations for 1 truths"):
        mean_next_line_exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no .* pairs"):
        mean_next_line_exact_match([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        mean_next_line_exact_match("a", "a")


# -- chrF -------------------------------------------------------------------------------------


def test_chrf_of_the_truth_is_one_and_of_unrelated_text_near_zero():
    truths = ["    let x = compute(a, b);\n    x + 1\n", "return values[key]\n"]
    assert chrf(truths, truths) == pytest.approx(1.0)
    assert chrf(["qqqq zzzz", "!!!!"], truths) < 0.05
    partial = chrf(["    let x = compute(a, c);\n    x - 1\n", "return values[key]\n"], truths)
    assert 0.5 < partial < 1.0


def test_chrf_cuts_the_generation_to_the_truths_line_count():
    truth = "fn a() {}\nfn b() {}\n"
    # Lines generated past the truth do not count against the model ...
    assert chrf([truth + "fn c() {}\nfn d() {}\n"], [truth]) == pytest.approx(1.0)
    # ... and the truth is cut to max_lines first.
    assert chrf(["line 1\nline 2\n"], ["line 1\nline 2\nline 3\n"], max_lines=2) == pytest.approx(1.0)
    assert chrf(["line 1\nline 2\n"], ["line 1\nline 2\nline 3\n"]) < 1.0


def test_chrf_is_torchmetrics_chrf_with_the_documented_settings():
    gens, truths = ["let y = a.b(c);", "x = 1"], ["let y = a.b(d);", "x = 2"]
    expected = chrf_score(gens, truths, n_char_order=6, n_word_order=0, beta=2.0)
    assert chrf(gens, truths) == pytest.approx(float(expected))
    # chrF ignores whitespace: indentation is judged by exact match, not here.
    assert chrf(["  let y = 1;"], ["let y=1;"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_lines"):
        chrf(gens, truths, max_lines=0)


# -- syntax validity --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [
    "fn main() { let x = ; }",
    "fn f( -> {",
    "fn main() {\n    let x = ;\n    let y = 2;\n    let z = 3;\n}\n",
])
def test_broken_rust_is_invalid(code):
    assert syntax_valid(code, "rust") is False
    assert syntax_valid(code, "rust", truncated=False) is False


def test_complete_code_is_valid():
    assert syntax_valid(RUST, "rust") is True
    assert syntax_valid(RUST, "rust", truncated=False) is True
    assert syntax_valid(PYTHON, "python", truncated=False) is True


@pytest.mark.parametrize(("source", "language", "item"), [(RUST, "rust", "pub fn add"), (PYTHON, "python", "def get")])
def test_code_cut_anywhere_in_the_last_function_is_valid(source, language, item):
    """Cuts inside strings, raw strings, nested comments, chains, struct literals, match arms."""
    start = source.index(item)
    invalid = [source[:i][-40:] for i in range(start, len(source)) if not syntax_valid(source[:i], language)]
    assert invalid == []


def test_a_cut_is_only_forgiven_when_the_code_is_marked_truncated():
    cut = RUST[: RUST.index("let total")]
    assert syntax_valid(cut, "rust") is True
    assert syntax_valid(cut, "rust", truncated=False) is False


def test_garbage_followed_by_valid_code_is_invalid():
    broken = "fn a() -> u32 {\n    1\n}\n@@@ !! ;;\nfn b() {}\nfn c() {}\nfn d() {}\n"
    assert syntax_valid(broken, "rust") is False
    python = "def a():\n    return 1\n\nx = = 2\n\ndef b():\n    pass\n\ndef c():\n    pass\n"
    assert syntax_valid(python, "python") is False


def test_an_error_in_the_middle_of_a_cut_function_is_invalid():
    lines = RUST.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "*entry += 1;" in line)
    mutated = "".join(lines[:at] + ["        let = = ;\n"] + lines[at:])
    for cut in range(len("".join(lines[: at + 4])), len(mutated), 37):
        assert syntax_valid(mutated[:cut], "rust") is False, mutated[:cut][-60:]


def test_a_missing_token_before_the_cut_is_an_error():
    # tree-sitter recovers from the missing `;` after `let a = 1` by inventing one: a MISSING node
    # mid-function, with no ERROR node anywhere and every bracket closed.
    assert syntax_valid("fn f() {\n    let a = 1\n    let b = 2;\n    let c = 3;\n    let d = 4;\n}\n", "rust") is False
    # At the cut, the missing `;` is a token the cut removed.
    assert syntax_valid("fn f() {\n    let v = foo\n        .bar()\n", "rust") is True


def test_errors_only_in_the_last_two_lines_are_forgiven_as_a_cut():
    head = "fn f() {\n    let a = 1;\n    let b = 2;\n"
    assert syntax_valid(head + "    let c = = 3;\n    let d = 4;\n", "rust") is True
    assert syntax_valid(head + "    let c = = 3;\n    let d = 4;\n    let e = 5;\n", "rust") is False


def test_languages_without_a_grammar_are_not_judged():
    assert syntax_valid("# Title\n", "markdown") is None
    assert syntax_validity_rate([("x = 1\n", "toml")]) is None
    assert syntax_validity_rate([]) is None


def test_validity_rate_counts_only_judged_samples():
    samples = [("fn main() {}\n", "rust"), ("fn f( -> {", "rust"), ("# doc", "markdown"),
               ("def f():\n    return 1\n", "python"), ("fn main() {\n    let x = 1;\n", "rust", False)]
    assert syntax_validity_rate(samples) == pytest.approx(2 / 4)
