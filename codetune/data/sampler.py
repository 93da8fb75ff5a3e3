"""Which windows each rank trains on, in which order, and from where a resumed epoch continues.

One epoch is a permutation of the window indices drawn from `(seed, epoch)` alone, so any process can
recompute it: a resumed run, or every rank of a DDP job, without communicating. The permutation is
cut into *global steps* of `batch_size x num_replicas` windows; within a step rank `r` takes the
`r`-th of `num_replicas` near-equal slices. Every window is trained exactly once per epoch, and every
rank runs the same number of steps (their collectives pair up). Only the last step can be short: its
windows are dealt out as evenly as possible, so a rank may get fewer — or, when fewer windows are
left than there are ranks, none (the module then contributes a zero gradient to that step).

Resuming mid-epoch: `start_step` skips the steps already trained in the current epoch. The data
module keeps `(epoch, steps done)` in its `state_dict`, so a checkpoint holds the data position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def epoch_order(n_windows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The window order of one epoch (the identity when not shuffled)."""
    if not shuffle:
        return np.arange(n_windows)
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_windows, generator=generator).numpy()


def steps_per_epoch(n_windows: int, batch_size: int, num_replicas: int = 1) -> int:
    return -(-n_windows // (batch_size * num_replicas))


def rank_batches(order: np.ndarray, batch_size: int, num_replicas: int, rank: int,
                 start_step: int = 0) -> Iterator[list[int]]:
    """This rank's batch of every global step from `start_step` on."""
    per_step = batch_size * num_replicas
    for step in range(start_step, steps_per_epoch(len(order), batch_size, num_replicas)):
        chunk = order[step * per_step:(step + 1) * per_step]
        yield np.array_split(chunk, num_replicas)[rank].tolist()


class WindowBatchSampler(DistributedSampler):
    """Yields this rank's optimizer batches (lists of window indices) for one epoch (see the module doc).

    It is a `DistributedSampler` so that Lightning neither wraps it in one of its own (it shards
    itself, which DistributedSampler cannot do without repeating or dropping windows) nor forgets to
    call `set_epoch` on it. Use it as a DataLoader's `sampler` with `batch_size=None`.
    """

    def __init__(self, n_windows: int, batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1,
                 rank: int = 0, epoch: int = 0, start_step: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # The parent's fields (num_samples, total_size) describe its own padding scheme and are unused here.
        super().__init__(range(n_windows), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.epoch = epoch
        self.start_step = start_step

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def __len__(self) -> int:
        # The whole epoch, also when resuming inside it: Lightning counts the steps already done itself.
        return steps_per_epoch(self.n_windows, self.batch_size, self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n_windows, self.seed, self.epoch, self.shuffle)
        start, self.start_step = self.start_step, 0  # a skip applies to the resumed epoch only
        return rank_batches(order, self.batch_size, self.num_replicas, self.rank, start)


class EpochTaggedBatchSampler(WindowBatchSampler):
    """A `WindowBatchSampler` whose batches come as `(epoch, indices)`: the collator of the training windows builds
    that epoch's fill-in-the-middle cuts (`codetune.data.fim.FimEpochs`), in whichever process it runs."""

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch = self.epoch
        return ((epoch, batch) for batch in super().__iter__())
