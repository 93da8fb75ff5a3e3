"""Fill-in-the-middle (FIM) prompts cut from held-out files, and how an infill is scored.

An editor's infill request is the code before the cursor (prefix) and the code after it (suffix);
the model writes the middle. A `FimPrompt` masks part of a held-out file and keeps the file's own
text there as the truth; `callbacks/generation_eval.py` sends prefix and suffix in the tokenizer's
FIM format (`codetune.data.fim.FimTokens.psm_prompt`) and scores the middle that comes back.

**Masks.** Two kinds, the two an editor asks for most:

* a *line*: one line of code whose stripped text has at least `MIN_LINE_CHARS` (8) characters (a lone `}`
  or `else:` says little about the model), never the file's first or last line
  (`codetune.eval.code_lines.code_line_indices`). Code, not prose: a comment or docstring line is no
  test of writing code like the repository's, so only languages with a grammar (Python, Rust) have
  line masks;
* a *block*: the body of a function or item (`codetune.eval.prompts.boundary_lines` finds their
  first lines): the lines after the signature line while they are blank or indented deeper than
  it, at most `max_block_lines` of them (a longer body masks its first lines), trailing blank lines
  left out. A signature whose next line is not indented deeper (an attribute, a one-line item) has
  no block.

**Cuts, per tokenizer.** A cut lies where the tokenizer's tokens break around a line start, as the
training samples are cut (`codetune.data.fim.line_cut_style`), so that a prompt's token ids are the
ones training showed. "after" (Qwen) cuts right after a line break: a masked line is
``"    x = 1\\n"`` and the prefix ends with the previous line's newline. "before" (GPT-2's byte-level
BPE, which merges a newline with the next line's indentation into one token) cuts right before the
line break: the prefix ends with the previous line's last character, the masked line is
``"\\n    x = 1"`` and the suffix starts with the masked line's newline. Either way
``head + prefix + middle + suffix + tail`` is the file.

**Bounds.** The prefix holds at most `max_prefix_chars` of the text before the mask and the suffix at
most `max_suffix_chars` of the text after it, both cut at the style's cut positions (so whole lines);
what is left out is kept in `head` and `tail`, so that the syntax check can rebuild the whole file.

**Choosing.** As `repo_prompts` does, deterministic and stable when other files change: files are
visited in the order of a hash of (seed, path), the masks of a file in the order of a hash of
(seed, path, kind, line), and prompts are taken round-robin over the files, at most `max_per_file`
of each kind per file. Half the prompts (rounded down) are blocks, the rest lines; when one kind has
too few (a file without functions), the other fills in. The result is sorted by path and line.

**Scores.** The *generated middle* is the generation cut to as many lines as the truth middle has
(`generated_middle`; `holds_middle` says when a generation holds them, so it can stop there), or
all of it when it ended (EOS) or hit its token cap first. Lines are counted as `str.splitlines`
counts them, and a truth that does not end with a line break ("before" cuts) ends where the next
line break would be written, since that break belongs to the suffix.

* `fim_exact_match` (line masks): the generated middle equals the truth, line by line, up to
  trailing whitespace (as `codetune.eval.metrics.next_line_exact_match` compares lines: indentation
  counts, and so does a line break the cut style puts before the line);
* `fim_chrf` (block masks): corpus chrF (`codetune.eval.metrics.chrf`) of generated against true middles;
* `fim_syntax_valid` (every mask in a language with a grammar): the share of files that still parse,
  judged whole, with the generated middle in place of the true one. A file that does not parse as
  it is says nothing about the middle, and is left out.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from codetune.data.fim import CutStyle
from codetune.eval.code_lines import code_line_indices
from codetune.eval.metrics import chrf, syntax_valid
from codetune.eval.prompts import boundary_lines, split_lines

MaskKind = Literal["line", "block"]


@dataclass(frozen=True)
class FimPrompt:
    """One infill prompt: the model sees `prefix` and `suffix` and writes the middle; `middle` is the file's."""

    path: str
    language: str
    kind: MaskKind
    line: int
    """1-based number of the first masked line."""
    prefix: str
    """The text before the mask, at most `max_prefix_chars`."""
    middle: str
    """The masked text, the truth (with the line break the cut style puts before or after it)."""
    suffix: str
    """The text after the mask, at most `max_suffix_chars`."""
    lines: int
    """Masked lines: the lines of the middle the metrics read."""
    head: str = ""
    """File text before `prefix` (empty when the prefix starts the file)."""
    tail: str = ""
    """File text after `suffix` (empty when the suffix ends the file)."""

    def program(self, middle: str) -> str:
        """The whole file with `middle` in the mask (`self.middle` gives the file itself)."""
        return self.head + self.prefix + middle + self.suffix + self.tail


def fim_prompts(
    files: Sequence[tuple[str, str, str]],
    max_prompts: int,
    seed: int = 0,
    style: CutStyle = "after",
    max_block_lines: int = 8,
    max_prefix_chars: int = 1500,
    max_suffix_chars: int = 800,
    max_per_file: int = 2,
) -> list[FimPrompt]:
    """Up to `max_prompts` masked lines and blocks of `files` (rel_path, language, text), cut in `style`.

    Raises:
        ValueError: a bound is not positive or the style is unknown (all problems in one message), or a
            path repeats.
    """
    _check_arguments(files, max_prompts, style, max_block_lines, max_prefix_chars, max_suffix_chars,
                     max_per_file)
    # Per kind: (file rank, the file's prompts of that kind in rank order, at most max_per_file).
    ranked: dict[MaskKind, list[tuple[bytes, list[FimPrompt]]]] = {"line": [], "block": []}
    for path, language, text in files:
        file = _File(text, style)
        spans = {"line": _line_masks(text, language, len(file.lines)),
                 "block": _block_masks(text, file.lines, language, max_block_lines)}
        for kind, kind_spans in spans.items():
            prompts = [file.prompt(path, language, kind, first, last, max_prefix_chars, max_suffix_chars)
                       for first, last in kind_spans]
            prompts.sort(key=lambda p: _rank(seed, p.path, p.kind, p.line))
            ranked[kind].append((_rank(seed, path), prompts[:max_per_file]))
    available = (sum(len(prompts) for _, prompts in ranked[kind]) for kind in ("block", "line"))
    blocks, lines = _shares(max_prompts, *available)
    chosen = _round_robin(ranked["block"], blocks, max_per_file) + _round_robin(ranked["line"], lines, max_per_file)
    return sorted(chosen, key=lambda p: (p.path, p.line, p.kind))


def _shares(max_prompts: int, blocks_available: int, lines_available: int) -> tuple[int, int]:
    """How many blocks and lines to take: half blocks (rounded down), the rest lines; either kind fills in
    for the other when it has too few."""
    blocks = min(max_prompts // 2, blocks_available)
    lines = min(max_prompts - blocks, lines_available)
    return min(max_prompts - lines, blocks_available), lines


# -- scores ------------------------------------------------------------------------------------------------


def holds_middle(generation: str, truth: str) -> bool:
    """Whether `generation` holds as many lines as the middle `truth` (the stop rule of a FIM request);
    its verdict changes only when a line break is written."""
    return _middle_cut(generation, truth) is not None


def generated_middle(generation: str, truth: str) -> str:
    """What the metrics read of `generation`: cut to the lines of `truth`, or all of it when it holds fewer
    (it ended with EOS, or at its token cap)."""
    cut = _middle_cut(generation, truth)
    return generation if cut is None else cut


def fim_exact_match(prompts: Sequence[FimPrompt], middles: Sequence[str]) -> float | None:
    """Share of line masks whose generated middle equals the truth up to trailing whitespace; None without any."""
    pairs = [(m, p.middle) for p, m in _paired(prompts, middles) if p.kind == "line"]
    if not pairs:
        return None
    return sum(_comparable(m) == _comparable(t) for m, t in pairs) / len(pairs)


def fim_chrf(prompts: Sequence[FimPrompt], middles: Sequence[str]) -> float | None:
    """Corpus chrF (0..1) of the block masks' generated middles against their truths; None without any."""
    pairs = [(m, p.middle) for p, m in _paired(prompts, middles) if p.kind == "block"]
    if not pairs:
        return None
    return chrf([m for m, _ in pairs], [t for _, t in pairs])


def fim_syntax_valid(prompts: Sequence[FimPrompt], middles: Sequence[str]) -> float | None:
    """Share of files (that parse as they are, in a language with a grammar) that still parse whole with
    the generated middle in the mask; None when no prompt counts."""
    verdicts = [syntax_valid(p.program(m), p.language, truncated=False)
                for p, m in _paired(prompts, middles)
                if syntax_valid(p.program(p.middle), p.language, truncated=False)]
    return sum(verdicts) / len(verdicts) if verdicts else None


def _middle_cut(generation: str, truth: str) -> str | None:
    """`generation` through as many lines as `truth` has, or None while it holds fewer. When `truth` does not
    end with a line break (a "before" cut), neither does the cut: its last line is complete once the next line
    break (the suffix's) is written, and that break is left out."""
    want = truth.splitlines(keepends=True)
    pieces = generation.splitlines(keepends=True)
    if len(pieces) < len(want) or not _ends_a_line(pieces[len(want) - 1]):
        return None
    cut = pieces[:len(want)]
    if not _ends_a_line(want[-1]):
        cut[-1] = cut[-1].splitlines()[0]
    return "".join(cut)


def _ends_a_line(piece: str) -> bool:
    return len(piece.splitlines()[0]) < len(piece)


def _comparable(middle: str) -> list[str]:
    """The lines of a middle without trailing whitespace (a leading line break and indentation stay)."""
    return [line.rstrip() for line in middle.rstrip().splitlines()]


def _paired(prompts: Sequence[FimPrompt], middles: Sequence[str]) -> Iterable[tuple[FimPrompt, str]]:
    if len(prompts) != len(middles):
        raise ValueError(f"{len(middles)} middles for {len(prompts)} prompts: they must pair up")
    return zip(prompts, middles)


# -- masks and cuts ----------------------------------------------------------------------------------------


class _File:
    """A file's lines and the positions a prompt may be cut at in one style."""

    def __init__(self, text: str, style: CutStyle) -> None:
        self.text = text
        self.style = style
        self.lines = split_lines(text)
        self.starts = list(accumulate(map(len, self.lines), initial=0))
        # "before": a cut lies before each line's terminator ("\n" or "\r\n"), and at the text's ends.
        self.ends = [start + len(line.rstrip("\r\n")) for start, line in zip(self.starts, self.lines)]
        self.cuts = self.starts if style == "after" else sorted({0, *self.ends, len(text)})

    def span(self, first: int, last: int) -> tuple[int, int]:
        """(start, end) of the middle that masks lines `first`..`last` (0-based, inclusive)."""
        if self.style == "after":
            return self.starts[first], self.starts[last + 1]
        return self.ends[first - 1] if first else 0, self.ends[last]

    def prompt(self, path: str, language: str, kind: MaskKind, first: int, last: int, max_prefix_chars: int,
               max_suffix_chars: int) -> FimPrompt:
        """The prompt masking lines `first`..`last` (0-based, inclusive; `first` > 0)."""
        start, end = self.span(first, last)
        # The farthest cuts within the bounds; start and end are cuts themselves, so these never pass them.
        prefix_start = self.cuts[bisect_left(self.cuts, start - max_prefix_chars)]
        suffix_end = self.cuts[bisect_right(self.cuts, end + max_suffix_chars) - 1]
        text = self.text
        return FimPrompt(path, language, kind, first + 1, text[prefix_start:start], text[start:end],
                         text[end:suffix_end], last - first + 1, text[:prefix_start], text[suffix_end:])


def mask_lines(text: str, first: int, last: int, style: CutStyle) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of `text` with its lines `first`..`last` (0-based, inclusive) as the middle, cut in
    `style` as the prompts are: `prefix + middle + suffix` is `text` (what `codetune generate --infill` sends)."""
    start, end = _File(text, style).span(first, last)
    return text[:start], text[start:end], text[end:]


def _line_masks(text: str, language: str, line_count: int) -> list[tuple[int, int]]:
    """The code lines worth masking but the last (a mask needs a suffix); none when the language has no grammar
    to tell code from prose."""
    return [(i, i) for i in code_line_indices(text, language) or () if i < line_count - 1]


def _block_masks(text: str, lines: Sequence[str], language: str, max_block_lines: int) -> list[tuple[int, int]]:
    """(first, last) body lines of each function or item (0-based, inclusive), at most `max_block_lines`."""
    spans = []
    for b in boundary_lines(text, language):
        depth = _indent(lines[b])
        last = b
        for k in range(b + 1, min(b + 1 + max_block_lines, len(lines))):
            if lines[k].strip() and _indent(lines[k]) <= depth:
                break
            if lines[k].strip():
                last = k  # trailing blank lines stay out of the mask
        if last > b:
            spans.append((b + 1, last))
    return spans


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _round_robin(ranked: list[tuple[bytes, list[FimPrompt]]], limit: int, max_per_file: int) -> list[FimPrompt]:
    """The first-ranked prompt of every file (files in rank order), then the second of every file, ..."""
    files = [prompts for _, prompts in sorted(ranked, key=lambda item: item[0])]
    chosen: list[FimPrompt] = []
    for round_ in range(max_per_file):
        for prompts in files:
            if len(chosen) == limit:
                return chosen
            if round_ < len(prompts):
                chosen.append(prompts[round_])
    return chosen


def _rank(seed: int, *key: object) -> bytes:
    return hashlib.blake2b(repr(("fim", seed, *key)).encode(), digest_size=8).digest()


def _check_arguments(files: Sequence[tuple[str, str, str]], max_prompts: int, style: str, max_block_lines: int,
                     max_prefix_chars: int, max_suffix_chars: int, max_per_file: int) -> None:
    problems = [f"{name} must be positive, got {value}" for name, value in (
        ("max_prompts", max_prompts), ("max_block_lines", max_block_lines), ("max_prefix_chars", max_prefix_chars),
        ("max_suffix_chars", max_suffix_chars), ("max_per_file", max_per_file)) if value < 1]
    if style not in ("after", "before"):
        problems.append(f"style must be 'after' or 'before', got {style!r}")
    paths = [path for path, _, _ in files]
    if len(set(paths)) != len(paths):
        problems.append(f"paths repeat: {sorted({p for p in paths if paths.count(p) > 1})}")
    if problems:
        raise ValueError("invalid fim_prompts arguments:\n  " + "\n  ".join(problems))
