"""What the data module's DataLoaders serve: packed windows, by index, turned into model inputs.

The samplers (`codetune.data.sampler`) yield whole optimizer batches of window indices (tagged with their epoch
when FIM samples are redrawn per epoch); `WindowDataset` passes the indices through and `WindowCollator` builds
the tensors in whichever process runs it. `evenly_spread` picks the held-out windows a validation runs on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from codetune.data.fim import FimEpochs
from codetune.data.packing import PackingMode, Windows, window_labels
from codetune.data.sampler import EpochTaggedBatchSampler, WindowBatchSampler


class WindowDataset(Dataset):
    """Window `i` of a split, with its index as the sample id."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int | list[int]) -> int | list[int]:
        # The sampler yields whole batches (lists of indices); the collator turns them into tensors.
        return index


class WindowCollator:
    """Builds model inputs for a list of window indices, or `(epoch, indices)` with that epoch's FIM cuts
    (picklable, for worker processes)."""

    def __init__(self, windows: Windows, packing: PackingMode, fim_epochs: FimEpochs | None = None) -> None:
        self.windows = windows
        self.packing = packing
        self.fim_epochs = fim_epochs

    def __call__(self, batch: list[int] | tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = batch if isinstance(batch, tuple) else (0, batch)
        idx = np.asarray(indices, dtype=np.int64)  # an empty list too (a rank with no window in a step)
        rows = self.fim_epochs.input_ids(epoch) if self.fim_epochs is not None else self.windows.input_ids
        input_ids = rows[idx]
        position_ids = self.windows.position_ids[idx]
        labels = window_labels(input_ids, position_ids, self.windows.n_real[idx], self.packing)
        return {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "sample_ids": torch.from_numpy(idx.astype(np.int64)),
        }


def window_loader(windows: Windows, packing: PackingMode, optimizer_batch_size: int, shuffle: bool, seed: int,
                  num_workers: int, replicas: int, rank: int, epoch: int = 0, start_step: int = 0,
                  fim_epochs: FimEpochs | None = None) -> DataLoader:
    """This rank's optimizer batches of `windows`, from `start_step` of `epoch` on (FIM cuts redrawn per epoch
    when `fim_epochs` is given)."""
    sampler_class = EpochTaggedBatchSampler if fim_epochs is not None else WindowBatchSampler
    sampler = sampler_class(len(windows), optimizer_batch_size, shuffle, seed,
                            num_replicas=replicas, rank=rank, epoch=epoch, start_step=start_step)
    # Its own generator: creating an iterator must not draw from the global RNG, which dropout uses
    # (a resumed run restores that RNG and must see the same draws).
    return DataLoader(WindowDataset(windows), sampler=sampler, batch_size=None,
                      collate_fn=WindowCollator(windows, packing, fim_epochs),
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))


def evenly_spread(windows: Windows, limit: int | None) -> Windows:
    """`limit` of `windows` at evenly spaced indices (`i * n // limit`: the first one, then every n/limit-th), in
    their order; all of them when there are no more than `limit` or it is None. A systematic sample: the windows
    follow the held-out files, so every stretch of the split is represented in proportion."""
    n = len(windows)
    if limit is None or n <= limit:
        return windows
    keep = np.arange(limit, dtype=np.int64) * n // limit
    return Windows(windows.input_ids[keep], windows.position_ids[keep], windows.n_real[keep])
