"""Fill-in-the-middle (FIM): the sentinel tokens of a model family, and turning file pieces into FIM samples.

An editor asks a code model to fill the gap between the code before the cursor (prefix) and after it
(suffix). Code models are pretrained for that with sentinel tokens; codetune finds them *by name* in
the tokenizer (`find_fim_tokens`, never hard-coded ids) and trains a share of the repository in that
format, so tuning on left-to-right text alone does not wear the skill away. Two orders, as in
Bavarian et al. 2022 and StarCoder:

* PSM: ``<prefix> P <suffix> S <middle> M <eos>``, what editors send (llama.cpp's /infill, Ollama,
  Continue, Tabby with Qwen's template);
* SPM: ``<prefix> <suffix> S <middle> P M <eos>``, the suffix first, then prefix and middle as one
  run (the paper's SPM variant that shares PSM's sentinels).

The EOS after the middle teaches the model where a middle ends.

**Where a piece is cut: line-aware, at token boundaries.** The prefix/middle and middle/suffix
cuts are token boundaries of the piece's own tokenization that touch a line break: the token
before ends with one, or the token after starts with one (`NewlineTable`). So a cut lies where a
cursor usually is, at the start or the end of a line (Refact's splitter is line-aware too), no
token straddles it, and each part's ids are a slice of the file's ids that decodes to exactly its
text (a line break is one byte, so no UTF-8 character is split): ``P + M + S`` is the piece. The
parts are not tokenized again, which keeps FIM free in ingest time: the token cache already holds
every file's ids. Byte-level BPE pre-tokenizers cut their input at line breaks (GPT-2's before a
``\\n``-plus-indentation run, Qwen's after a newline), so such a slice is, with few exceptions at
whitespace runs, the ids the part would get if tokenized alone, as an editor's prefix and suffix are
(`bench/fim_samples.py` measures the share). Character-level cuts (StarCoder) would put cursors
inside tokens and words, which an editor's FIM request rarely does between keystrokes, at the price
of re-tokenizing every part.

**Pieces.** A FIM sample must fit in one window with its sentinels and EOS (and its file header), so a
file longer than that is cut first into pieces at line-break boundaries (`pieces`), each piece a sample of
its own. Every piece is FIM with probability ``fim_rate``, drawn once per run: that fixes the
windows' layout. Every epoch, each FIM piece is drawn anew SPM with probability ``spm_rate`` (else
PSM) and its middle anew, as its `MiddleMix` says: one whole line, a block of a few whole lines (lines
as the tokenizer cuts them, `NewlineTable.line_starts`), or two different boundaries drawn uniformly
(the piece's start and end count, so prefix or suffix may be empty; the middle never is). Uniform
cuts make mostly long middles, while an editor mostly asks for a line or a short block and needs
the model to stop after it. Over a run the model sees a piece infilled at as many places as there
are epochs, as on-the-fly FIM gives it, while every epoch keeps the same windows and steps (a sample's length does not depend on its cut; `FimEpochs`). The draws
are hashes of ``(seed, path, piece)`` and, for the cut, the epoch: the epoch is part of the data
position a checkpoint holds, so every rank and every resume sees the same samples, and adding a
file changes no other file's samples. Reports count epoch 0's PSM and SPM samples.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from codetune.storage import atomic_write_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FimOrder = Literal["psm", "spm"]
NEWLINE_TABLE = "newlines.npy"  # in the token cache's directory of a tokenizer
CutStyle = Literal["after", "before"]

# (family, prefix, suffix, middle, file separators, most specific first): the sentinels each family was
# pretrained with. A tokenizer has FIM when it holds all three of a family's sentinels as single tokens.
FIM_FAMILIES: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", ("<|file_sep|>", "<|file_separator|>")),
    ("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<file_sep>", "<filename>")),
    ("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ()),
    ("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ()),
)


@dataclass(frozen=True)
class FimTokens:
    """The FIM sentinels of a tokenizer: their ids and their text (for prompts written as text)."""

    family: str
    prefix: int
    suffix: int
    middle: int
    prefix_text: str
    suffix_text: str
    middle_text: str
    file_sep: int | None = None
    """The repository-format file separator (`<|file_sep|>`), when the tokenizer has one."""
    file_sep_text: str | None = None

    def names(self) -> dict[str, str | None]:
        return {"family": self.family, "prefix": self.prefix_text, "suffix": self.suffix_text,
                "middle": self.middle_text, "file_sep": self.file_sep_text}

    def psm_prompt(self, prefix: str, suffix: str, header: str = "") -> str:
        """The text of a PSM infill request: the model writes the middle after it (then EOS)."""
        return f"{header}{self.prefix_text}{prefix}{self.suffix_text}{suffix}{self.middle_text}"

    def header(self, path: str) -> str:
        """The repository-format header of a file (`<|file_sep|>path\\n`); needs `file_sep`."""
        if self.file_sep_text is None:
            raise ValueError(f"the {self.family} tokenizer has no file separator token")
        return f"{self.file_sep_text}{path}\n"


def find_fim_tokens(tokenizer: PreTrainedTokenizerBase) -> FimTokens | None:
    """The FIM sentinels of the first family in `FIM_FAMILIES` whose three tokens `tokenizer` has; None if none."""
    vocab = tokenizer.get_vocab()
    for family, prefix, suffix, middle, separators in FIM_FAMILIES:
        if all(name in vocab for name in (prefix, suffix, middle)):
            sep = next((s for s in separators if s in vocab), None)
            return FimTokens(family, vocab[prefix], vocab[suffix], vocab[middle], prefix, suffix, middle,
                             vocab[sep] if sep else None, sep)
    return None


def fim_families_text() -> str:
    """The sentinel names looked for, for messages: `<|fim_prefix|>` (qwen), `<fim_prefix>` (starcoder), ..."""
    return ", ".join(f"{prefix} ({family})" for family, prefix, *_ in FIM_FAMILIES)


class MiddleMix(NamedTuple):
    """How the middle of a FIM sample is drawn each epoch: one line with probability `line_rate`, a block of 2 to
    `block_lines` whole lines with probability `block_rate`, else two uniform cuts (long middles, mostly)."""

    line_rate: float = 0.0
    block_rate: float = 0.0
    block_lines: int = 8

    @property
    def uniform(self) -> bool:
        return self.line_rate == 0 and self.block_rate == 0


UNIFORM_MIDDLES = MiddleMix()
DEFAULT_MIDDLES = MiddleMix(line_rate=0.25, block_rate=0.25, block_lines=8)  # --data.fim_line_rate ... defaults


# -- line-break boundaries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewlineTable:
    """Per token id: does its text start with a line break, does it end with one (decoded alone)."""

    starts: np.ndarray
    ends: np.ndarray
    style: CutStyle
    """Where the tokenizer's tokens break around a line start (`line_cut_style`): which boundaries start a line."""

    def __post_init__(self) -> None:
        # One lookup per file instead of two: bit 0 "starts with a line break", bit 1 "ends with one".
        object.__setattr__(self, "_code", (self.starts | (self.ends.astype(np.uint8) << 1)).astype(np.uint8))

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path | None = None) -> NewlineTable:
        """The table of `tokenizer`. With `cache_dir`, the token cache's directory of this very tokenizer
        (`codetune.data.tokens.CacheStats.directory`, named by its fingerprint), the table is read from
        `newlines.npy` there, or computed and written there once: building it reads the whole vocabulary
        (9 ms for 32k tokens, several times that for Qwen's 151k), which an unchanged re-run should not repeat.
        An entry of the wrong shape is treated as a miss and rewritten, as the token cache treats its own."""
        path = Path(cache_dir) / NEWLINE_TABLE if cache_dir is not None else None
        cached = _read_table(path, len(tokenizer)) if path is not None else None
        if cached is not None:
            return cls(cached[0], cached[1], line_cut_style(tokenizer))
        table = cls._computed(tokenizer)
        if path is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.stack((table.starts, table.ends)))
            atomic_write_bytes(path, buffer.getvalue())
        return table

    @classmethod
    def _computed(cls, tokenizer: PreTrainedTokenizerBase) -> NewlineTable:
        vocab = tokenizer.get_vocab()
        # Only a token whose stored form holds a line break can decode to one: "\n" itself, byte-level BPE's "Ċ"
        # (GPT-2's printable stand-in for byte 0x0A), or SentencePiece's byte-fallback "<0x0A>". Decoding just
        # those keeps this cheap on a 150k-token vocabulary.
        candidates = [i for token, i in vocab.items() if "\n" in token or "Ċ" in token or "<0x0A>" in token]
        starts, ends = np.zeros(len(tokenizer), dtype=bool), np.zeros(len(tokenizer), dtype=bool)
        texts = tokenizer.backend_tokenizer.decode_batch([[i] for i in candidates], skip_special_tokens=False)
        for i, text in zip(candidates, texts):
            starts[i], ends[i] = text.startswith("\n"), text.endswith("\n")
        return cls(starts, ends, line_cut_style(tokenizer))

    def boundaries(self, ids: np.ndarray) -> np.ndarray:
        """Indices k (0 < k < len(ids)) where the cut between ids[k-1] and ids[k] touches a line break."""
        if len(ids) < 2:
            return np.zeros(0, dtype=np.int64)
        code = self._code.take(ids)
        # The 0/1 bytes viewed as bools: nonzero on a bool array is several times faster than on uint8.
        return np.nonzero(((code[:-1] >> 1) | (code[1:] & 1)).view(np.bool_))[0] + 1

    def line_starts(self, ids: np.ndarray) -> np.ndarray:
        """Indices k (0 < k < len(ids)) where a line starts as the tokenizer cuts lines: right after a token that
        ends with a line break ("after"), or right before one that starts with one ("before"). A subset of
        `boundaries`: one per line break, so that two consecutive ones hold exactly one line."""
        if len(ids) < 2:
            return np.zeros(0, dtype=np.int64)
        if self.style == "after":
            return np.nonzero(self.ends.take(ids[:-1]))[0] + 1
        return np.nonzero(self.starts.take(ids[1:]))[0] + 1


def _read_table(path: Path, size: int) -> np.ndarray | None:
    try:
        table = np.load(path)
    except (FileNotFoundError, ValueError, EOFError):  # absent, or not written whole by `atomic_write_bytes`
        return None
    return table if table.shape == (2, size) and table.dtype == np.bool_ else None


def line_cut_style(tokenizer: PreTrainedTokenizerBase) -> CutStyle:
    """Where this tokenizer's tokens break around an indented line's start: "after" the newline (Qwen: the
    prefix may end with the newline), or "before" it (GPT-2's byte-level BPE merges the newline with the next
    line's indentation, so a cut lies at the previous line's end). Infill prompts are cut there, like training."""
    probe = "x = f(y);\n    z = 1\n"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ends = {len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))}  # where each token ends in the probe
    return "after" if probe.index("\n") + 1 in ends else "before"


# -- pieces and samples ------------------------------------------------------------------------------------


def pieces(n_tokens: int, boundaries: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Cut `n_tokens` ids into (start, end) pieces of at most `budget` ids, at line-break `boundaries` (sorted) where
    one lies in reach (else a hard cut at the budget: a line longer than a window), of near-equal length."""
    if budget < 1:
        raise ValueError(f"a piece needs a budget of at least 1 token, got {budget}")
    out, start = [], 0
    while n_tokens - start > budget:
        left = n_tokens - start
        target = start + -(-left // -(-left // budget))  # equal shares of what is left
        reach = _between(boundaries, start + 1, start + budget + 1)
        end = int(reach[np.argmin(np.abs(reach - target))]) if len(reach) else start + budget
        out.append((start, end))
        start = end
    out.append((start, n_tokens))
    return out


def _between(boundaries: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return boundaries[boundaries.searchsorted(lo):boundaries.searchsorted(hi)]


class FimCut(NamedTuple):
    """How one piece becomes a FIM sample: its order and its two cuts (ids offsets within the piece)."""

    order: FimOrder
    middle_start: int
    middle_end: int


def is_fim(seed: int, path: str, piece: int, fim_rate: float) -> bool:
    """Whether piece `piece` of `path` is a FIM sample: drawn once per run (it decides the windows' layout)."""
    digest = hashlib.blake2b(f"fim:{seed}:{path}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fim_rate


def epoch_cut(seed: int, path: str, piece: int, n_tokens: int, boundaries: np.ndarray, spm_rate: float,
              epoch: int, lines: np.ndarray | None = None, mix: MiddleMix = UNIFORM_MIDDLES) -> FimCut:
    """The order and cut of a FIM piece in `epoch`: as `mix` draws the middle, one line or a short block of the
    piece's `lines` (its line starts, a subset of `boundaries`), or two different candidates among the piece's
    start, its line-break `boundaries` and its end, uniformly."""
    spm, first, second = _draws(seed, path, piece, epoch)
    order: FimOrder = "spm" if spm < spm_rate else "psm"
    if not mix.uniform:
        if lines is None:
            raise ValueError("line and block middles need the piece's line starts")
        kind, where, length = _draws(seed, path, piece, epoch, "span")
        if kind < mix.line_rate + mix.block_rate:
            span = 1 if kind < mix.line_rate else 2 + int(length * (mix.block_lines - 1))
            return FimCut(order, *_whole_lines(n_tokens, lines, where, span))
    count = len(boundaries) + 2
    a = int(first * count)
    b = int(second * (count - 1))
    b += b >= a  # drawn among the others
    a, b = sorted((a, b))
    return FimCut(order, _candidate(a, n_tokens, boundaries), _candidate(b, n_tokens, boundaries))


def _whole_lines(n_tokens: int, lines: np.ndarray, where: float, span: int) -> tuple[int, int]:
    """`span` whole lines (fewer at the piece's end) from the line start at `where` (a uniform in [0, 1))."""
    starts = np.concatenate(([0], lines, [n_tokens]))
    first = int(where * (len(starts) - 1))
    return int(starts[first]), int(starts[min(first + span, len(starts) - 1)])


def _candidate(k: int, n_tokens: int, boundaries: np.ndarray) -> int:
    return 0 if k == 0 else n_tokens if k == len(boundaries) + 1 else int(boundaries[k - 1])


def fim_sample(ids: np.ndarray, cut: FimCut, tokens: FimTokens, eos_id: int,
               header: Sequence[int] = ()) -> np.ndarray:
    """The sample's ids: `header`, then the piece `ids` in `cut.order` with the sentinels, then EOS."""
    p, m, s = ids[:cut.middle_start], ids[cut.middle_start:cut.middle_end], ids[cut.middle_end:]
    out = np.empty(len(header) + len(ids) + SENTINELS_PER_SAMPLE, dtype=np.int32)
    out[:len(header)] = header
    if cut.order == "psm":
        parts = ([tokens.prefix], p, [tokens.suffix], s, [tokens.middle], m, [eos_id])
    else:
        parts = ([tokens.prefix, tokens.suffix], s, [tokens.middle], p, m, [eos_id])
    at = len(header)
    for part in parts:
        out[at:at + len(part)] = part
        at += len(part)
    return out


SENTINELS_PER_SAMPLE = 4  # three sentinels and the EOS
DEFAULT_FIM_RATE = 0.5  # StarCoder's, SantaCoder's and Refact's rate


def _draws(seed: int, path: str, piece: int, epoch: int, what: str = "") -> tuple[float, float, float]:
    """Three uniforms in [0, 1) from a hash of (seed, path, piece, epoch): SPM or not and the two cuts, or with
    `what` "span", the middle's kind, where it starts and its length in lines (a hash of its own, so that adding a
    mix leaves the uniform cuts as they were). A hash is a tenth of the cost of seeding a generator per piece, and
    as reproducible (as `is_fim`'s, without epoch)."""
    key = f"fim{what}:{seed}:{path}:{piece}:{epoch}"
    digest = hashlib.blake2b(key.encode(), digest_size=24).digest()
    return tuple(x / 2**64 for x in struct.unpack("<3Q", digest))


class FimRecord(NamedTuple):
    """Where one FIM sample came from: its file, its piece (ids `start:end` of the file) and its cut."""

    path: str
    piece: int
    start: int
    end: int
    cut: FimCut


class FimPiece(NamedTuple):
    """What a FIM sample is redrawn from every epoch: its piece's ids, header and line-break boundaries."""

    path: str
    piece: int
    ids: np.ndarray
    header: np.ndarray
    boundaries: np.ndarray
    lines: np.ndarray | None
    """Its line starts (`NewlineTable.line_starts`) when line or block middles are drawn, else None."""


@dataclass
class TrainingSamples:
    """A split's samples, ready to pack: `stream` segments (left-to-right, cut anywhere) and `whole` FIM samples
    (each kept inside one window), with what became of every piece."""

    stream: list[np.ndarray]
    whole: list[np.ndarray]
    records: list[FimRecord]
    pieces: int
    fim_pieces: list[FimPiece] = field(default_factory=list)
    """Parallel to `whole` and `records`."""

    def counts(self) -> dict[str, int]:
        psm = sum(r.cut.order == "psm" for r in self.records)
        return {"pieces": self.pieces, "fim": len(self.records), "psm": psm, "spm": len(self.records) - psm,
                "left_to_right": self.pieces - len(self.records)}


def training_samples(paths: Sequence[str], files: Sequence[np.ndarray], eos_id: int, seq_len: int, seed: int,
                     fim_rate: float = 0.0, spm_rate: float = 0.5, tokens: FimTokens | None = None,
                     table: NewlineTable | None = None, headers: Sequence[np.ndarray] | None = None,
                     mix: MiddleMix = UNIFORM_MIDDLES) -> TrainingSamples:
    """The samples of `files` (ids, no EOS; `headers[i]` goes before every sample of file i).

    Without FIM (`fim_rate` 0) every file is one stream segment, `header + ids + EOS`, as plain packing makes it.
    With FIM, a file is cut into `pieces` that fit a window with the sentinels, EOS and header; each piece is
    drawn FIM or not (`is_fim`) and a FIM piece cut (`epoch_cut`, epoch 0); the consecutive left-to-right pieces of a file stay one segment (EOS only at
    the file's end), so left-to-right text keeps its context across pieces as before.
    """
    if fim_rate > 0 and (tokens is None or table is None):
        raise ValueError("FIM samples need the tokenizer's FIM tokens and its NewlineTable")
    no_header = np.zeros(0, dtype=np.int32)
    eos = np.array([eos_id], dtype=np.int32)
    out = TrainingSamples([], [], [], 0, [])
    # Every file's boundaries from one pass over all ids (one call per file would cost more in overhead than in
    # work); a file's are the slice of them inside it.
    starts = np.cumsum([0] + [len(ids) for ids in files])
    joined = np.concatenate(files) if fim_rate > 0 and len(files) else None
    everywhere = table.boundaries(joined) if joined is not None else None
    line_starts = table.line_starts(joined) if joined is not None and not mix.uniform else None
    for i, (path, ids) in enumerate(zip(paths, files)):
        header = headers[i] if headers is not None else no_header
        budget = seq_len - len(header) - SENTINELS_PER_SAMPLE
        if fim_rate == 0 or budget < 1:
            out.stream.append(np.concatenate((header, ids, eos), dtype=np.int32))
            out.pieces += 1
            continue
        boundaries = _between(everywhere, starts[i] + 1, starts[i + 1]) - starts[i]
        lines = _between(line_starts, starts[i] + 1, starts[i + 1]) - starts[i] if line_starts is not None else None
        _add_file(out, path, np.asarray(ids, dtype=np.int32), _Cuts(boundaries, lines), header, eos, budget, seed,
                  fim_rate, spm_rate, tokens, mix)
    return out


class _Cuts(NamedTuple):
    """A file's line-break boundaries and, for line and block middles, its line starts."""

    boundaries: np.ndarray
    lines: np.ndarray | None

    def inside(self, start: int, end: int) -> _Cuts:
        """The cuts strictly inside ids `start:end`, as offsets from `start`."""
        lines = _between(self.lines, start + 1, end) - start if self.lines is not None else None
        return _Cuts(_between(self.boundaries, start + 1, end) - start, lines)


def _add_file(out: TrainingSamples, path: str, ids: np.ndarray, cuts: _Cuts, header: np.ndarray, eos: np.ndarray,
              budget: int, seed: int, fim_rate: float, spm_rate: float, tokens: FimTokens, mix: MiddleMix) -> None:
    if len(ids) <= budget and not is_fim(seed, path, 0, fim_rate):  # one left-to-right piece: no cut to find
        out.stream.append(np.concatenate((header, ids, eos), dtype=np.int32))
        out.pieces += 1
        return
    run: list[np.ndarray] = []  # the left-to-right pieces since the last FIM one

    def close_run(at_end: bool) -> None:
        if run:
            out.stream.append(np.concatenate([header, *run, eos if at_end else eos[:0]], dtype=np.int32))
            run.clear()

    for j, (start, end) in enumerate(pieces(len(ids), cuts.boundaries, budget)):
        out.pieces += 1
        if not is_fim(seed, path, j, fim_rate) or end == start:
            run.append(ids[start:end])
            continue
        inner = cuts.inside(start, end)
        cut = epoch_cut(seed, path, j, end - start, inner.boundaries, spm_rate, 0, inner.lines, mix)
        close_run(at_end=False)
        out.whole.append(fim_sample(ids[start:end], cut, tokens, int(eos[0]), header))
        out.records.append(FimRecord(path, j, start, end, cut))
        out.fim_pieces.append(FimPiece(path, j, ids[start:end], header, inner.boundaries, inner.lines))
    close_run(at_end=True)


class FimEpochs:
    """The training windows of every epoch: the same layout, each FIM sample redrawn (order and cut) per epoch.

    A FIM sample's length does not depend on its cut, so every epoch packs the same samples into the same places;
    only what lies between a FIM sample's sentinels changes. Epoch 0 is the windows as packed. The arrays of the
    last epoch asked for are kept (one epoch's windows at a time), so a collator calls `input_ids` per batch.

    Args:
        input_ids: The packed windows of epoch 0, `[windows, seq_len]`.
        placements: (window, column) of each FIM sample, as `codetune.data.packing.whole_placements` gives them.
        pieces: The FIM samples' pieces, in the same order.
    """

    def __init__(self, input_ids: np.ndarray, placements: Sequence[tuple[int, int]], pieces: Sequence[FimPiece],
                 tokens: FimTokens, eos_id: int, seed: int, spm_rate: float,
                 mix: MiddleMix = UNIFORM_MIDDLES) -> None:
        if len(placements) != len(pieces):
            raise ValueError(f"{len(placements)} placements for {len(pieces)} FIM pieces")
        self.base = input_ids
        self.placements = list(placements)
        self.pieces = list(pieces)
        self.tokens, self.eos_id, self.seed, self.spm_rate, self.mix = tokens, eos_id, seed, spm_rate, mix
        self._cached: tuple[int, np.ndarray] = (0, input_ids)

    def input_ids(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            self._cached = (epoch, self._build(epoch))
        return self._cached[1]

    def _build(self, epoch: int) -> np.ndarray:
        out = self.base.copy()
        for (window, column), p in zip(self.placements, self.pieces):
            cut = epoch_cut(self.seed, p.path, p.piece, len(p.ids), p.boundaries, self.spm_rate, epoch, p.lines,
                            self.mix)
            sample = fim_sample(p.ids, cut, self.tokens, self.eos_id, p.header)
            out[window, column:column + len(sample)] = sample
        return out
