"""Packing tokenized files into fixed-length training windows.

Algorithm. Files are taken in a fixed order; each file's tokens are followed by one EOS token and
all files are concatenated into one stream, which is cut into windows of exactly `seq_len` tokens.
A long file therefore continues into the next window, and a window usually holds the end of one
file and the start of others. Only the very last window of a split is padded, so the packing
efficiency (real tokens / window tokens) is above 99.5% as soon as a split holds a few hundred
windows. The trade-off against best-fit bin packing (no file ever split) is deliberate: best-fit
wastes padding on repositories of many mid-sized files, and a file cut at a window boundary only
loses the left context of its first tokens in the next window.

Isolation (`packing="isolated"`, the default). Position ids restart at 0 at every file start and at
every window start. Given `position_ids` and no `attention_mask`, transformers builds a
block-diagonal causal mask from them (sdpa/eager; flash-attention varlen on GPU), so no token
attends to another file. A window that continues a file restarts its positions at 0 too: rotary
embeddings only see relative positions, so the offset is harmless, and it keeps positions below
`seq_len` whatever the file length. Labels are masked (-100) wherever the position is 0, so the
first token of a file is never predicted from the previous file's EOS; the loss shift makes the
first token of a window a non-target anyway.

Concatenation (`packing="concat"`). Positions run 0..seq_len-1 across file boundaries and tokens
attend to earlier files in the window: the classic GPT-style packing, kept as an option.

Fill-in-the-middle samples (`pack_samples`, `codetune.data.fim`) must not be cut: a middle
without its prefix and suffix teaches nothing. Windows are filled with them next-fit, in order,
and the space each window has left is filled from the left-to-right stream above, which flows on
from one window's gap into the next's (a fragment restarts its positions like a window start).
Only when the stream runs out before the FIM samples does a window other than the last end in
padding, so efficiency stays where the stream alone puts it while the stream lasts (at
`--data.fim_rate` 1 every window of FIM samples ends in padding); FIM samples sit in the first windows, which the sampler shuffles anyway.

Padding (at the end of a window; only the last one without FIM) has position 0 and label -100; `n_real` records the real tokens per
window so padding is never a target even when the pad id equals a real token id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PackingMode = Literal["isolated", "concat"]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Windows:
    """Packed windows of one split: arrays of shape [n_windows, seq_len] (int32) and [n_windows]."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    n_real: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def efficiency(self) -> float:
        """Real tokens / window tokens (1.0 for an empty split)."""
        total = self.input_ids.size
        return float(self.n_real.sum() / total) if total else 1.0


def pack_windows(files: Sequence[np.ndarray], seq_len: int, eos_id: int, pad_id: int,
                 mode: PackingMode = "isolated") -> Windows:
    """Concatenate `files` (token ids, no EOS) with one EOS after each, and cut `seq_len` windows."""
    eos = np.array([eos_id], dtype=np.int32)
    return pack_samples([np.concatenate((np.asarray(f, dtype=np.int32), eos)) for f in files], [], seq_len, pad_id,
                        mode)


def pack_samples(stream: Sequence[np.ndarray], whole: Sequence[np.ndarray], seq_len: int, pad_id: int,
                 mode: PackingMode = "isolated") -> Windows:
    """Windows holding every `whole` sample inside one window and the `stream` segments cut anywhere.

    Both kinds are complete token sequences (EOS, sentinels and headers included). Windows are filled with
    whole samples next-fit, in order; the space a window has left is filled from the stream, which continues
    in the next window's gap; once the whole samples are placed, the rest of the stream is cut into full
    windows as `pack_windows` does. Only where the stream runs out before the whole samples does a window end
    in padding before the last one. Every segment, whole sample and window-gap fragment restarts the position
    ids in `isolated` mode.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    too_long = [len(w) for w in whole if len(w) > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} whole samples are longer than seq_len {seq_len} (e.g. {too_long[0]})")
    lengths = np.array([len(s) for s in stream], dtype=np.int64)
    flat = np.concatenate(stream, dtype=np.int32) if len(stream) else np.zeros(0, dtype=np.int32)
    segment_start_of = np.repeat(np.cumsum(lengths) - lengths, lengths)
    layout = [([whole[i] for i in indices], seq_len - used)
              for indices, used in _layout([len(w) for w in whole], seq_len)]
    n_windows = len(layout) + max(0, -(-(len(flat) - sum(gap for _, gap in layout)) // seq_len))
    if n_windows == 0:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return Windows(empty, empty.copy(), np.zeros(0, dtype=np.int32))
    input_ids = np.full((n_windows, seq_len), pad_id, dtype=np.int32)
    position_ids = np.zeros((n_windows, seq_len), dtype=np.int32)
    n_real = np.zeros(n_windows, dtype=np.int32)
    taken = 0  # stream tokens placed so far
    for w in range(n_windows):
        samples, gap = layout[w] if w < len(layout) else ([], seq_len)
        used = 0
        for sample in samples:
            input_ids[w, used:used + len(sample)] = sample
            position_ids[w, used:used + len(sample)] = np.arange(len(sample))
            used += len(sample)
        fragment = slice(taken, min(taken + gap, len(flat)))
        n = fragment.stop - fragment.start
        index = np.arange(fragment.start, fragment.stop, dtype=np.int64)
        input_ids[w, used:used + n] = flat[fragment]
        # A fragment restarts at a segment start and where it starts in this window.
        position_ids[w, used:used + n] = index - np.maximum(segment_start_of[fragment], fragment.start)
        taken, n_real[w] = fragment.stop, used + n
    if mode == "concat":
        position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int32), input_ids.shape).copy()
    elif mode != "isolated":
        raise ValueError(f"--data.packing must be 'isolated' or 'concat', got {mode!r}")
    position_ids[np.arange(seq_len)[None, :] >= n_real[:, None]] = 0
    return Windows(input_ids, position_ids, n_real)


def whole_placements(lengths: Sequence[int], seq_len: int) -> list[tuple[int, int]]:
    """(window, column) where `pack_samples` puts each whole sample of these lengths."""
    return [(w, column) for w, (indices, _) in enumerate(_layout(lengths, seq_len))
            for column in np.cumsum([0] + [lengths[i] for i in indices[:-1]]).tolist()]


def _layout(lengths: Sequence[int], seq_len: int) -> list[tuple[list[int], int]]:
    """(whole samples' indices, tokens they use) of each window that holds whole samples, filled next-fit."""
    layout, i = [], 0
    while i < len(lengths):
        indices, used = [], 0
        while i < len(lengths) and used + lengths[i] <= seq_len:
            indices.append(i)
            used += lengths[i]
            i += 1
        layout.append((indices, used))
    return layout


def window_labels(input_ids: np.ndarray, position_ids: np.ndarray, n_real: np.ndarray,
                  mode: PackingMode) -> np.ndarray:
    """Labels for a batch of windows (HF convention: aligned with inputs, shifted by the loss)."""
    labels = input_ids.astype(np.int64)
    seq_len = input_ids.shape[-1]
    labels[np.arange(seq_len)[None, :] >= n_real[:, None]] = IGNORE_INDEX
    if mode == "isolated":
        # Position 0 starts a file: never a target, so no file is predicted from another's context.
        labels[position_ids == 0] = IGNORE_INDEX
    return labels
