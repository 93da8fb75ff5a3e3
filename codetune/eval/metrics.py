"""Scores for generated code: held-out perplexity, completion quality, syntax validity.

All functions are pure: plain strings and numbers in, a number out. The prompts they score come
from `codetune.eval.prompts.repo_prompts` (a held-out file cut at a line start, before a line of code
where a grammar tells code from prose: the model sees the prefix and generates, the file's own text
after the cut is the truth).

**Perplexity.** `perplexity_from_loss(mean_nll)` is `exp(mean_nll)`, where `mean_nll` is the mean
negative log-likelihood per *target token* (natural log) over the whole held-out set: the sum of
token losses divided by the number of targets, not a mean of per-batch means. That is what
`CodeLoRAModule` logs as `val/loss`, so the value equals its `val/perplexity`.

**Next-line exact match.** The first non-blank line of the generation against the first non-blank
line of the truth, compared after stripping trailing whitespace only. Leading indentation counts:
in Python it is syntax, and in any language a line at the wrong depth is a different program.
A pair scores 1.0 or 0.0; `mean_next_line_exact_match` is the fraction of pairs that match.

**chrF.** Character n-gram F-score (Popović, 2015) through torchmetrics' `chrf_score` with the
settings of sacrebleu's default chrF: character n-grams of order 1 to 6 (`n_char_order=6`), no word
n-grams (`n_word_order=0`; chrF, not chrF++: whitespace-separated "words" of code such as `foo(bar,`
are arbitrary units), recall weighted twice as much as precision (`beta=2`), case-sensitive, and
whitespace removed before counting (so indentation and spacing do not count here; exact match
checks them). Of the usual text metrics, chrF is the one whose ranking of code generation models
agrees best with human judgement (Evtikhiev et al., "Out of the BLEU", JSS 2023).
The score is corpus-level (n-gram statistics summed over all pairs, then one F-score, as sacrebleu
and torchmetrics compute it), on a 0..1 scale: a generation equal to its truth scores 1.0.
To bound the comparison, the truth is cut to its first `max_lines` lines and the generation to the
same number of lines as that cut truth: a model is not penalised for generating past the truth
it is compared with, which is itself only the start of the rest of the file.

**What a completion is scored on.** `scored_prefix(generated, truth)` is the start of a generation
that the two metrics above read: its lines through the one that completes both the first non-blank
line (exact match) and as many lines as chrF compares (the truth's line count, at most
`max_lines`), line breaks included; None while the generation does not hold all of that yet. Any
text after it changes neither score, so generation can stop there (`codetune.eval.stopping`) and
score what it would have scored at full length. Syntax validity is judged on the same prefix, as a
cut completion (below), so that it does not depend on how far past it generation ran.

**Syntax validity.** `syntax_valid(code, language)` parses `code` (the prompt's prefix followed by
the generation: the generation alone is a fragment) with a tree-sitter grammar (`tree-sitter-rust`,
`tree-sitter-python`) and returns None for a language without one. A generation usually stops in
the middle of an item (at `max_new_tokens`, or at its scored prefix), so with `truncated=True`
(the default) the rule is
"could this text be the beginning of a valid program", decided as follows:

1. Candidate texts: the code itself, then the code without its last non-blank line, then without
   its last two (`MAX_DROPPED_LINES`); a candidate that is blank is not tried.
2. Each candidate is closed: a lexer that knows the language's comments and strings finds what is
   still open at its end, and appends, in order, what ends the open string or block comment, a
   newline, and the closing brackets of every unclosed `(`, `[`, `{`, innermost first.
3. The closed candidate is parsed. It is valid when the tree has no ERROR node anywhere and no
   MISSING node (a token tree-sitter had to invent) before the candidate's last non-whitespace
   character: a missing `;` or `)` *at the cut* is a token the cut removed, one earlier is a bug.
4. The code is valid if any candidate is. (Code that parses cleanly as it is, is valid at once.)

So a syntax error in the last one or two non-blank lines of a truncated generation is forgiven
(it cannot be told apart from a cut through a multi-line statement), and anything earlier is not:
`fn main() { let x = ; }` and `fn f( -> {` are invalid, a valid function cut anywhere in its body
is valid, garbage followed by valid code is invalid. With `truncated=False` (the generation ended
by itself, with an end-of-sequence token) the code is judged whole: valid iff the tree has no ERROR
and no MISSING node. "Valid" means the tree-sitter grammar accepts it, which is slightly more
permissive than a compiler (tree-sitter-python accepts a trailing `if x:` with no body).
`syntax_validity_rate` is the fraction of valid samples among those whose language has a grammar.

Cost (measured on one CPU core, on a 200-line, 4.9 kB Rust file): `syntax_valid` takes 0.4 ms when
the code is valid and complete (one parse), 0.8 ms when it is cut in the middle of a function body,
and 3.1 ms in the worst case, an error early in the file (one parse, then three lexes and parses).
chrF is the slow metric: torchmetrics builds a tensor per n-gram count, about 38 ms per pair of
20-line (480-character) texts, 3.8 s for 100 pairs; `max_lines` bounds it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import tree_sitter
from torchmetrics.functional.text import chrf_score

from codetune.eval.code_lines import grammar_parser

CHRF_CHAR_ORDER = 6
CHRF_WORD_ORDER = 0
CHRF_BETA = 2.0
CHRF_MAX_LINES = 20
MAX_DROPPED_LINES = 2

_CLOSING = {"(": ")", "[": "]", "{": "}"}


# -- perplexity -------------------------------------------------------------------------------


def perplexity_from_loss(mean_nll: float) -> float:
    """Perplexity `exp(mean_nll)` from the mean per-token negative log-likelihood (nats); inf on overflow."""
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative number of nats per token, got {mean_nll}")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# -- completion quality -----------------------------------------------------------------------


def next_line_exact_match(generated: str, truth: str) -> float:
    """1.0 if the first non-blank lines of `generated` and `truth` are equal up to trailing whitespace, else 0.0."""
    expected = _first_nonblank_line(truth)
    if expected is None:
        raise ValueError("truth has no non-blank line: there is no next line to predict")
    return float(_first_nonblank_line(generated) == expected)


def mean_next_line_exact_match(generated: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of (generated, truth) pairs whose next lines match (`next_line_exact_match`)."""
    _check_pairs(generated, truths)
    return sum(map(next_line_exact_match, generated, truths)) / len(truths)


def chrf(generated: Sequence[str], truths: Sequence[str], max_lines: int = CHRF_MAX_LINES) -> float:
    """Corpus chrF (0..1) of generations against truths, each cut to the truth's first `max_lines` lines."""
    _check_pairs(generated, truths)
    if max_lines < 1:
        raise ValueError(f"max_lines must be a positive integer, got {max_lines}")
    preds, targets = [], []
    for gen, truth in zip(generated, truths):
        truth_lines = truth.splitlines()[:max_lines]
        targets.append("\n".join(truth_lines))
        preds.append("\n".join(gen.splitlines()[: len(truth_lines)]))
    score = chrf_score(preds, targets, n_char_order=CHRF_CHAR_ORDER, n_word_order=CHRF_WORD_ORDER,
                       beta=CHRF_BETA, lowercase=False, whitespace=False)
    return float(score)


def scored_prefix(generated: str, truth: str, max_lines: int = CHRF_MAX_LINES) -> str | None:
    """The start of `generated` that exact match and chrF read against `truth` (see the module docstring),
    or None while `generated` does not hold all of it: text added then could still change a score."""
    needed = len(truth.splitlines()[:max_lines])
    lines = generated.splitlines(keepends=True)
    first_nonblank = None
    for i, piece in enumerate(lines):
        content = piece.splitlines()[0]
        if len(content) == len(piece):  # no line break yet: the last line may still grow
            return None
        if first_nonblank is None and content.strip():
            first_nonblank = i
        if first_nonblank is not None and i + 1 >= needed:
            return "".join(lines[: i + 1])
    return None


def _first_nonblank_line(text: str) -> str | None:
    return next((line.rstrip() for line in text.splitlines() if line.strip()), None)


def _check_pairs(generated: Sequence[str], truths: Sequence[str]) -> None:
    if isinstance(generated, str) or isinstance(truths, str):
        raise TypeError("generated and truths must be lists of strings, not a single string")
    if len(generated) != len(truths):
        raise ValueError(f"{len(generated)} generations for {len(truths)} truths: they must pair up")
    if not truths:
        raise ValueError("no (generated, truth) pairs to score")


# -- syntax validity --------------------------------------------------------------------------


def syntax_valid(code: str, language: str, *, truncated: bool = True) -> bool | None:
    """Whether `code` (prompt prefix + generation) parses; None without a grammar for `language`.

    With `truncated` (the generation was cut: by `max_new_tokens` or at its scored prefix), an unfinished tail is
    tolerated by the rule in the module docstring; otherwise the whole text must parse without ERROR or MISSING
    nodes.
    """
    parser = grammar_parser(language)
    if parser is None:
        return None
    if not parser.parse(code.encode()).root_node.has_error:
        return True
    if not truncated:
        return False
    for kept in _tail_candidates(code):
        tree = parser.parse((kept + _closing_suffix(kept, language)).encode())
        if not _has_error_before(tree.root_node, len(kept.rstrip().encode())):
            return True
    return False


def syntax_validity_rate(samples: Iterable[tuple[str, str] | tuple[str, str, bool]]) -> float | None:
    """Fraction of valid samples, each `(code, language[, truncated])` as for `syntax_valid`.

    Samples in a language without a grammar are left out; None when no sample has one.
    """
    verdicts = [v for code, language, *truncated in samples
                if (v := syntax_valid(code, language, truncated=truncated[0] if truncated else True)) is not None]
    return sum(verdicts) / len(verdicts) if verdicts else None


def _tail_candidates(code: str) -> Iterable[str]:
    """`code`, then `code` without its last non-blank line, ... (up to `MAX_DROPPED_LINES` dropped)."""
    kept = code
    for _ in range(MAX_DROPPED_LINES + 1):
        if not kept.strip():
            return
        yield kept
        kept = kept.rstrip()
        kept = kept[: kept.rfind("\n") + 1]


def _has_error_before(node: tree_sitter.Node, cut_byte: int) -> bool:
    """Any ERROR node, or a MISSING node that starts before `cut_byte`, in the subtree of `node`."""
    if node.is_error or (node.is_missing and node.start_byte < cut_byte):
        return True
    # `has_error` covers ERROR and MISSING descendants: only those subtrees are walked.
    return node.has_error and any(_has_error_before(child, cut_byte) for child in node.children)


# -- closing what a cut left open -------------------------------------------------------------

_RUST_TOKEN = re.compile(r"""
    (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*)
  | (?<!\w)[bc]?r(?P<raw_hashes>\#*)"
  | (?P<string>")
  | '(?:\\(?:u\{[0-9a-fA-F]{1,6}\}|x[0-9a-fA-F]{2}|[^\n])|[^\\'\n])'   # char literal, not a lifetime
  | (?P<bracket>[()\[\]{}])
""", re.VERBOSE)
_RUST_STRING_END = re.compile(r'(?:[^"\\]|\\[\s\S])*"')
_RUST_COMMENT_MARK = re.compile(r"/\*|\*/")

_PYTHON_TOKEN = re.compile(r"""
    (?P<comment>\#[^\n]*)
  | (?P<string>'''|\"\"\"|'|")
  | (?P<bracket>[()\[\]{}])
""", re.VERBOSE)
_PYTHON_STRING_END = {
    "'''": re.compile(r"(?:[^\\]|\\[\s\S])*?'''"),
    '"""': re.compile(r'(?:[^\\]|\\[\s\S])*?"""'),
    # A one-line string that meets a newline is unterminated (a syntax error); lexing resumes there.
    "'": re.compile(r"(?:[^'\\\n]|\\[\s\S])*(?:'|(?=\n))"),
    '"': re.compile(r'(?:[^"\\\n]|\\[\s\S])*(?:"|(?=\n))'),
}


def _closing_suffix(text: str, language: str) -> str:
    """What closes the string or comment open at the end of `text`, a newline, then its open brackets."""
    lex = _lex_rust if language == "rust" else _lex_python
    open_brackets, unterminated = lex(text)
    return unterminated + "\n" + "".join(_CLOSING[b] for b in reversed(open_brackets))


def _lex_rust(text: str) -> tuple[list[str], str]:
    """(open brackets in order, closer of the string or block comment still open at the end)."""
    stack: list[str] = []
    pos = 0
    while match := _RUST_TOKEN.search(text, pos):
        pos = match.end()
        if match["bracket"]:
            _push_or_pop(stack, match["bracket"])
        elif match["block_comment"]:
            pos, depth = _skip_block_comment(text, pos)
            if depth:
                return stack, "*/" * depth
        elif match["raw_hashes"] is not None:
            closer = '"' + match["raw_hashes"]
            end = text.find(closer, pos)
            if end < 0:
                return stack, closer
            pos = end + len(closer)
        elif match["string"]:
            end = _RUST_STRING_END.match(text, pos)
            if end is None:
                return stack, '"'
            pos = end.end()
    return stack, ""


def _skip_block_comment(text: str, pos: int) -> tuple[int, int]:
    """Position after a (nested) block comment opened just before `pos`, and its depth still open at EOF."""
    depth = 1
    while depth and (mark := _RUST_COMMENT_MARK.search(text, pos)):
        depth += 1 if mark.group() == "/*" else -1
        pos = mark.end()
    return (pos, 0) if depth == 0 else (len(text), depth)


def _lex_python(text: str) -> tuple[list[str], str]:
    """(open brackets in order, closing quote of the string still open at the end)."""
    stack: list[str] = []
    pos = 0
    while match := _PYTHON_TOKEN.search(text, pos):
        pos = match.end()
        if match["bracket"]:
            _push_or_pop(stack, match["bracket"])
        elif quote := match["string"]:
            end = _PYTHON_STRING_END[quote].match(text, pos)
            if end is None:
                return stack, quote
            pos = end.end()
    return stack, ""


def _push_or_pop(stack: list[str], bracket: str) -> None:
    if bracket in _CLOSING:
        stack.append(bracket)
    elif stack and _CLOSING[stack[-1]] == bracket:
        stack.pop()
    # An unmatched closer is a syntax error the parser reports; it does not change what is open.
