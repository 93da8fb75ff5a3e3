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

Padding (last window only) has position 0 and label -100; `n_real` records the real tokens per
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
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    lengths = np.array([len(f) + 1 for f in files], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return Windows(empty, empty.copy(), np.zeros(0, dtype=np.int32))
    stream = np.empty(total, dtype=np.int32)
    file_starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for start, tokens, length in zip(file_starts, files, lengths):
        stream[start:start + length - 1] = tokens
        stream[start + length - 1] = eos_id

    n_windows = -(-total // seq_len)
    padded = n_windows * seq_len
    index = np.arange(total, dtype=np.int64)
    if mode == "isolated":
        file_start_of = np.repeat(file_starts, lengths)
        window_start_of = (index // seq_len) * seq_len
        positions = index - np.maximum(file_start_of, window_start_of)
    elif mode == "concat":
        positions = index % seq_len
    else:
        raise ValueError(f"--data.packing must be 'isolated' or 'concat', got {mode!r}")

    input_ids = np.full(padded, pad_id, dtype=np.int32)
    position_ids = np.zeros(padded, dtype=np.int32)
    input_ids[:total] = stream
    position_ids[:total] = positions
    n_real = np.full(n_windows, seq_len, dtype=np.int32)
    n_real[-1] = total - (n_windows - 1) * seq_len
    return Windows(input_ids.reshape(n_windows, seq_len), position_ids.reshape(n_windows, seq_len), n_real)


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
