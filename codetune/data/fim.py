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
(`bench/ingest.py` measures the share). Character-level cuts (StarCoder) would put cursors inside
tokens and words, which an editor's FIM request rarely does between keystrokes, at the price of
re-tokenizing every part.

**Pieces.** A FIM sample must fit in one window with its sentinels and EOS (and its file header), so a
file longer than that is cut first into pieces at line-break boundaries (`pieces`), each piece a sample of
its own. Every piece is FIM with probability ``fim_rate``, and a FIM piece is SPM with probability
``spm_rate``; its two cuts are two different boundaries drawn uniformly (the piece's start and end
count, so prefix or suffix may be empty; the middle never is). All draws come from a generator seeded
by ``(seed, path, piece)``: the same files give the same samples on every rank and at every resume,
and adding a file changes no other file's samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FimOrder = Literal["psm", "spm"]
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


# -- line-break boundaries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewlineTable:
    """Per token id: does its text start with a line break, does it end with one (decoded alone)."""

    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> NewlineTable:
        vocab = tokenizer.get_vocab()
        # Only a token whose stored form holds a line break can decode to one: "\n" itself, byte-level BPE's "Ċ"
        # (GPT-2's printable stand-in for byte 0x0A), or SentencePiece's byte-fallback "<0x0A>". Decoding just
        # those keeps this cheap on a 150k-token vocabulary.
        candidates = [i for token, i in vocab.items() if "\n" in token or "Ċ" in token or "<0x0A>" in token]
        starts, ends = np.zeros(len(tokenizer), dtype=bool), np.zeros(len(tokenizer), dtype=bool)
        texts = tokenizer.backend_tokenizer.decode_batch([[i] for i in candidates], skip_special_tokens=False)
        for i, text in zip(candidates, texts):
            starts[i], ends[i] = text.startswith("\n"), text.endswith("\n")
        return cls(starts, ends)

    def boundaries(self, ids: np.ndarray) -> np.ndarray:
        """Indices k (0 < k < len(ids)) where the cut between ids[k-1] and ids[k] touches a line break."""
        if len(ids) < 2:
            return np.zeros(0, dtype=np.int64)
        touches = self.ends[ids[:-1]] | self.starts[ids[1:]]
        return np.flatnonzero(touches) + 1


def line_cut_style(tokenizer: PreTrainedTokenizerBase) -> CutStyle:
    """Where this tokenizer's tokens break around an indented line's start: "after" the newline (Qwen: the
    prefix may end with the newline), or "before" it (GPT-2's byte-level BPE merges the newline with the next
    line's indentation, so a cut lies at the previous line's end). Infill prompts are cut there, like training."""
    probe = "x = f(y);\n    z = 1\n"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ends = np.cumsum([len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))])
    return "after" if probe.index("\n") + 1 in set(ends.tolist()) else "before"


# -- pieces and samples ------------------------------------------------------------------------------------


def pieces(n_tokens: int, boundaries: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Cut `n_tokens` ids into (start, end) pieces of at most `budget` ids, at line-break `boundaries` where one
    lies in reach (else a hard cut at the budget: a line longer than a window), of near-equal length."""
    if budget < 1:
        raise ValueError(f"a piece needs a budget of at least 1 token, got {budget}")
    if n_tokens <= budget:
        return [(0, n_tokens)]
    out, start = [], 0
    while n_tokens - start > budget:
        left = n_tokens - start
        target = start + -(-left // -(-left // budget))  # equal shares of what is left
        reach = boundaries[np.searchsorted(boundaries, start, side="right"):
                           np.searchsorted(boundaries, start + budget, side="right")]
        end = int(reach[np.argmin(np.abs(reach - target))]) if len(reach) else start + budget
        out.append((start, end))
        start = end
    out.append((start, n_tokens))
    return out


@dataclass(frozen=True)
class FimCut:
    """How one piece becomes a FIM sample: its order and its two cuts (ids offsets within the piece)."""

    order: FimOrder
    middle_start: int
    middle_end: int


def draw_cut(seed: int, path: str, piece: int, n_tokens: int, boundaries: np.ndarray, fim_rate: float,
             spm_rate: float) -> FimCut | None:
    """The FIM cut of piece `piece` of `path` (`boundaries` relative to the piece), or None: left-to-right."""
    draws = _draws(seed, path, piece)
    if n_tokens == 0 or not draws[0] < fim_rate:
        return None
    return _cut(draws, n_tokens, boundaries, spm_rate)


def _cut(draws: tuple[float, ...], n_tokens: int, boundaries: np.ndarray, spm_rate: float) -> FimCut:
    order: FimOrder = "spm" if draws[1] < spm_rate else "psm"
    candidates = np.concatenate(([0], boundaries, [n_tokens]))
    # Two different candidates, uniformly: the second is drawn among the others.
    a = int(draws[2] * len(candidates))
    b = int(draws[3] * (len(candidates) - 1))
    b += b >= a
    a, b = sorted((a, b))
    return FimCut(order, int(candidates[a]), int(candidates[b]))


def fim_sample(ids: np.ndarray, cut: FimCut, tokens: FimTokens, eos_id: int,
               header: Sequence[int] = ()) -> np.ndarray:
    """The sample's ids: `header`, then the piece `ids` in `cut.order` with the sentinels, then EOS."""
    p, m, s = ids[:cut.middle_start], ids[cut.middle_start:cut.middle_end], ids[cut.middle_end:]
    if cut.order == "psm":
        parts = [header, [tokens.prefix], p, [tokens.suffix], s, [tokens.middle], m, [eos_id]]
    else:
        parts = [header, [tokens.prefix, tokens.suffix], s, [tokens.middle], p, m, [eos_id]]
    return np.concatenate([np.asarray(x, dtype=np.int32) for x in parts])


SENTINELS_PER_SAMPLE = 4  # three sentinels and the EOS
DEFAULT_FIM_RATE = 0.5  # StarCoder's, SantaCoder's and Refact's rate


def _draws(seed: int, path: str, piece: int) -> tuple[float, float, float, float]:
    """Four uniforms in [0, 1) from a hash of (seed, path, piece): FIM or not, SPM or not, the two cuts. A hash is
    a tenth of the cost of seeding a generator per piece, and as reproducible."""
    digest = hashlib.blake2b(f"fim:{seed}:{path}:{piece}".encode(), digest_size=32).digest()
    return tuple(int.from_bytes(digest[k:k + 8], "big") / 2**64 for k in range(0, 32, 8))


@dataclass(frozen=True)
class FimRecord:
    """Where one FIM sample came from: its file, its piece (ids `start:end` of the file) and its cut."""

    path: str
    piece: int
    start: int
    end: int
    cut: FimCut


@dataclass
class TrainingSamples:
    """A split's samples, ready to pack: `stream` segments (left-to-right, cut anywhere) and `whole` FIM samples
    (each kept inside one window), with what became of every piece."""

    stream: list[np.ndarray]
    whole: list[np.ndarray]
    records: list[FimRecord]
    pieces: int

    def counts(self) -> dict[str, int]:
        psm = sum(r.cut.order == "psm" for r in self.records)
        return {"pieces": self.pieces, "fim": len(self.records), "psm": psm, "spm": len(self.records) - psm,
                "left_to_right": self.pieces - len(self.records)}


def training_samples(paths: Sequence[str], files: Sequence[np.ndarray], eos_id: int, seq_len: int, seed: int,
                     fim_rate: float = 0.0, spm_rate: float = 0.5, tokens: FimTokens | None = None,
                     table: NewlineTable | None = None,
                     headers: Sequence[np.ndarray] | None = None) -> TrainingSamples:
    """The samples of `files` (ids, no EOS; `headers[i]` goes before every sample of file i).

    Without FIM (`fim_rate` 0) every file is one stream segment, `header + ids + EOS`, as plain packing makes it.
    With FIM, a file is cut into `pieces` that fit a window with the sentinels, EOS and header; each piece is
    drawn FIM or not (`draw_cut`); the consecutive left-to-right pieces of a file stay one segment (EOS only at
    the file's end), so left-to-right text keeps its context across pieces as before.
    """
    if fim_rate > 0 and (tokens is None or table is None):
        raise ValueError("FIM samples need the tokenizer's FIM tokens and its NewlineTable")
    no_header = np.zeros(0, dtype=np.int32)
    eos = np.array([eos_id], dtype=np.int32)
    out = TrainingSamples([], [], [], 0)
    for i, (path, ids) in enumerate(zip(paths, files)):
        header = headers[i] if headers is not None else no_header
        budget = seq_len - len(header) - SENTINELS_PER_SAMPLE
        if fim_rate == 0 or budget < 1:
            out.stream.append(np.concatenate((header, ids, eos)).astype(np.int32))
            out.pieces += 1
            continue
        _add_file(out, path, np.asarray(ids, dtype=np.int32), header, eos, budget, seed, fim_rate, spm_rate, tokens,
                  table)
    return out


def _add_file(out: TrainingSamples, path: str, ids: np.ndarray, header: np.ndarray, eos: np.ndarray, budget: int,
              seed: int, fim_rate: float, spm_rate: float, tokens: FimTokens, table: NewlineTable) -> None:
    if len(ids) <= budget and not _draws(seed, path, 0)[0] < fim_rate:  # one left-to-right piece: no cut to find
        out.stream.append(np.concatenate((header, ids, eos)).astype(np.int32))
        out.pieces += 1
        return
    boundaries = table.boundaries(ids)
    run: list[np.ndarray] = []  # the left-to-right pieces since the last FIM one

    def close_run(at_end: bool) -> None:
        if run:
            out.stream.append(np.concatenate([header, *run, eos if at_end else eos[:0]]).astype(np.int32))
            run.clear()

    for j, (start, end) in enumerate(pieces(len(ids), boundaries, budget)):
        out.pieces += 1
        inner = boundaries[np.searchsorted(boundaries, start, "right"):np.searchsorted(boundaries, end, "left")] - start
        cut = draw_cut(seed, path, j, end - start, inner, fim_rate, spm_rate)
        if cut is None:
            run.append(ids[start:end])
            continue
        close_run(at_end=False)
        out.whole.append(fim_sample(ids[start:end], cut, tokens, int(eos[0]), header))
        out.records.append(FimRecord(path, j, start, end, cut))
    close_run(at_end=True)
