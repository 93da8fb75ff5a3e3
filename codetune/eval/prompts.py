"""Completion prompts cut from held-out files of the user's repository.

A prompt is a held-out file cut at a line start, as when a user presses Enter in the editor: the model
sees the file up to the cut and its generation is compared with the file's own text after it
(`codetune.eval.metrics`: next-line exact match reads the first line, chrF the continuation).

**Where to cut.** A user asks for the next line anywhere in a file, mostly in the middle of a body, and
line-completion benchmarks (CodeXGLUE line completion, RepoBench) likewise draw random code lines; a cut
only after signatures would ask for the hardest line of a file (a body's first) every time.

* Languages with a grammar (Python, Rust): any line the FIM line masks may take
  (`codetune.eval.code_lines.code_line_indices`) can be the truth's first line: code, not prose
  (a comment or a docstring is no test of writing code like the repository's), at least
  `MIN_LINE_CHARS` (8) non-blank characters (a lone `}` or `else:` says little about the model),
  and not the file's first line. The prompt ends with the line before it.
* Any other language (Markdown, TOML, ...): nothing tells code from prose, so the cut follows a
  paragraph's first line (a non-blank line right after a blank line), and the truth is what follows.

**Boundaries** (`boundary_lines`, the first lines of functions and items that the FIM block masks
start from, and the paragraph starts above) are found by a regular expression on line starts, after
optional indentation (so methods and nested items count): a line-start rule needs no parse, never
depends on the file being valid, and finds the same items in ordinary code; its one miss is a matching
line inside a multi-line string.

* Rust: an optional visibility (`pub`, `pub(crate)`, `pub(super)`, ...) and optional qualifiers
  (`async`, `const`, `unsafe`, `extern "C"`), then `fn`, `struct`, `enum`, `trait` or `mod` and
  whitespace, or `impl` as a whole word (`impl<T>`); or an attribute `#[` (not the inner `#![`).
* Python: `def `, `async def `, `class `, or a decorator `@`.
* Any other language: a paragraph start.

**Cutting.** For a cut after line *i* (0-based), `prefix` is the file's text from the start of the file
through the end of line *i*, newline included; when that is longer than `max_prefix_chars`, lines are
dropped from the front (it starts at a line start) and kept in `head`, so `head + prefix + generation`
(`RepoPrompt.program`) is the whole file up to the cut followed by the generation: that is the text
`syntax_valid` should parse, since a prefix cut inside an `impl` or `class` would leave brackets or
indentation unmatched. `continuation` is the text after line *i*: at most `max_continuation_lines`
lines, and if that is longer than `max_continuation_chars`, cut to its whole lines that fit (or
hard-cut, when not even the first line fits). A cut is skipped when `prefix` has fewer than
`min_prefix_lines` lines before line *i*, when line *i* alone is longer than `max_prefix_chars`, when
it is the file's last line, or when its (bounded) continuation is blank.

**Choosing.** Deterministic, and stable when other files change: files are visited in the order of
a hash of (seed, path), the cuts within a file in the order of a hash of (seed, path, line).
Prompts are taken round-robin, the first-ranked cut of every file, then the second of every
file, ..., up to `max_per_file` per file and `max_prompts` in all, so a few large files cannot take
every slot. The result is sorted by path and line.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from codetune.data.fim import CutStyle
from codetune.eval.code_lines import code_line_indices

_BOUNDARY = {
    "rust": re.compile(
        r"[ \t]*(?:#\[|(?:pub(?:\([^)\n]*\))?\s+)?(?:(?:async|const|unsafe|extern\s+\"[^\"\n]*\")\s+)*"
        r"(?:(?:fn|struct|enum|trait|mod)\s|impl\b))"
    ),
    "python": re.compile(r"[ \t]*(?:def\s|async\s+def\s|class\s|@)"),
}
_LINE = re.compile(r"[^\n]*\n|[^\n]+\Z")


@dataclass(frozen=True)
class RepoPrompt:
    """One completion prompt: the model continues `prefix`; `continuation` is what the file says."""

    path: str
    language: str
    prefix: str
    """The file up to the cut (whole lines), at most `max_prefix_chars` (the model gets `model_input`)."""
    continuation: str
    """The file's own text after `prefix`, bounded in lines and characters."""
    line: int
    """1-based number of the prompt's last line, the line before the truth."""
    head: str
    """File text before `prefix`, cut off to respect `max_prefix_chars` (empty when nothing was)."""
    style: CutStyle = "before"
    """Where the tokenizer's tokens break around a line start (`codetune.data.fim.line_cut_style`)."""

    @property
    def model_input(self) -> str:
        """What the model continues. "after" (Qwen: a newline is a token of its own): `prefix`, ending where the
        user pressed Enter. "before": `prefix` without its final newline, the model writes the line break and
        the indentation itself, since byte-level BPE merges a newline with the next line's indentation and a
        prompt ending in a bare newline asks for a token sequence that training never showed (typically: EOS)."""
        return self.prefix if self.style == "after" else self.prefix.removesuffix("\n")

    def program(self, generation: str) -> str:
        """`head + model_input + generation`: the file up to the cut, then what the model wrote after its input
        (what `syntax_valid` parses; the file's own text there is `"\\n" + continuation`)."""
        return self.head + self.model_input + generation


def repo_prompts(
    files: Sequence[tuple[str, str, str]],
    max_prompts: int,
    min_prefix_lines: int = 5,
    max_prefix_chars: int = 4000,
    max_continuation_lines: int = 20,
    max_continuation_chars: int = 1200,
    max_per_file: int = 3,
    seed: int = 0,
    style: CutStyle = "before",
) -> list[RepoPrompt]:
    """Up to `max_prompts` prompts cut before code lines of `files` (rel_path, language, text), or after
    paragraph starts without a grammar, their model input ending as the tokenizer's `style` cuts lines.

    Raises:
        ValueError: a bound is not positive (all problems in one message), or a path repeats.
    """
    _check_arguments(files, max_prompts, min_prefix_lines, max_prefix_chars, max_continuation_lines,
                     max_continuation_chars, max_per_file)
    ranked: list[tuple[str, list[RepoPrompt]]] = []
    for path, language, text in files:
        lines = split_lines(text)
        offsets = list(accumulate(map(len, lines), initial=0))
        prompts: list[RepoPrompt] = []
        # In rank order (a prompt's `line` is its last line's index + 1), cutting only until the file has enough.
        for i in sorted(_cut_indices(text, lines, language), key=lambda i: _rank(seed, path, i + 1)):
            if len(prompts) == max_per_file:
                break
            prompt = _cut(path, language, lines, offsets, i, min_prefix_lines, max_prefix_chars,
                          max_continuation_lines, max_continuation_chars, style)
            if prompt is not None:
                prompts.append(prompt)
        ranked.append((path, prompts))
    ranked.sort(key=lambda item: _rank(seed, item[0]))
    chosen: list[RepoPrompt] = []
    for round_ in range(max_per_file):
        for _, prompts in ranked:
            if len(chosen) == max_prompts:
                break
            if round_ < len(prompts):
                chosen.append(prompts[round_])
    return sorted(chosen, key=lambda p: (p.path, p.line))


def boundary_lines(text: str, language: str) -> list[int]:
    """0-based indices of the lines of `text` that start a function or item (a paragraph elsewhere)."""
    return _boundary_indices(split_lines(text), language)


def split_lines(text: str) -> list[str]:
    """Lines of `text` with their newlines; only "\\n" ends a line (`str.splitlines` also splits at
    form feeds and U+2028, which would shift line numbers against every editor)."""
    return _LINE.findall(text)


def _cut_indices(text: str, lines: Sequence[str], language: str) -> list[int]:
    """0-based indices of the lines a prompt may end with: the line before each code line worth completing, or
    a paragraph's first line in a language without a grammar."""
    code = code_line_indices(text, language)
    if code is None:
        return _boundary_indices(lines, language)
    return [i - 1 for i in code]


def _boundary_indices(lines: Sequence[str], language: str) -> list[int]:
    pattern = _BOUNDARY.get(language)
    if pattern is None:
        return [i for i in range(1, len(lines)) if lines[i].strip() and not lines[i - 1].strip()]
    return [i for i, line in enumerate(lines) if pattern.match(line)]


def _cut(path: str, language: str, lines: Sequence[str], offsets: Sequence[int], i: int, min_prefix_lines: int,
         max_prefix_chars: int, max_continuation_lines: int, max_continuation_chars: int,
         style: CutStyle) -> RepoPrompt | None:
    """The prompt cut after line `i` (0-based), or None when it is skipped.

    `offsets[k]` is the character offset of line `k` (`offsets[len(lines)]` is the text's length).
    """
    if not lines[i].endswith("\n") or len(lines[i]) > max_prefix_chars:
        return None
    # The first line start from which the prefix fits in max_prefix_chars.
    start = bisect_left(offsets, offsets[i + 1] - max_prefix_chars, 0, i)
    if i - start < min_prefix_lines:
        return None
    continuation = _bounded("".join(lines[i + 1 : i + 1 + max_continuation_lines]), max_continuation_chars)
    if not continuation.strip():
        return None
    return RepoPrompt(path, language, "".join(lines[start : i + 1]), continuation, i + 1, "".join(lines[:start]),
                      style)


def _bounded(text: str, max_chars: int) -> str:
    """`text` cut to the whole lines that fit in `max_chars`, or hard-cut if no whole line fits."""
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars)
    return text[: end + 1] if end >= 0 else text[:max_chars]


def _rank(seed: int, *key: object) -> bytes:
    return hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()


def _check_arguments(files: Sequence[tuple[str, str, str]], max_prompts: int, min_prefix_lines: int,
                     max_prefix_chars: int, max_continuation_lines: int, max_continuation_chars: int,
                     max_per_file: int) -> None:
    problems = [f"{name} must be positive, got {value}" for name, value in (
        ("max_prompts", max_prompts), ("max_prefix_chars", max_prefix_chars),
        ("max_continuation_lines", max_continuation_lines), ("max_continuation_chars", max_continuation_chars),
        ("max_per_file", max_per_file)) if value < 1]
    if min_prefix_lines < 0:
        problems.append(f"min_prefix_lines must be zero or more, got {min_prefix_lines}")
    paths = [path for path, _, _ in files]
    if len(set(paths)) != len(paths):
        problems.append(f"paths repeat: {sorted({p for p in paths if paths.count(p) > 1})}")
    if problems:
        raise ValueError("invalid repo_prompts arguments:\n  " + "\n  ".join(problems))
