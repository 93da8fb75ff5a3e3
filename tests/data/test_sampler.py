"""The window sampler: every window once per epoch across ranks, equal step counts, resumable position."""

from __future__ import annotations

from collections import Counter

import pytest

from codetune.data.sampler import WindowBatchSampler, steps_per_epoch


def epoch_batches(n: int, batch: int, replicas: int, epoch: int = 0, start: int = 0, seed: int = 3):
    samplers = [WindowBatchSampler(n, batch, shuffle=True, seed=seed, num_replicas=replicas, rank=r, epoch=epoch,
                                   start_step=start) for r in range(replicas)]
    return [list(s) for s in samplers], samplers


@pytest.mark.parametrize("n, batch, replicas", [(14, 4, 1), (9, 4, 2), (17, 2, 3), (3, 4, 4), (64, 8, 2)])
def test_every_window_exactly_once_and_every_rank_runs_every_step(n, batch, replicas):
    per_rank, samplers = epoch_batches(n, batch, replicas)
    steps = steps_per_epoch(n, batch, replicas)
    assert all(len(batches) == steps == len(s) for batches, s in zip(per_rank, samplers))
    ids = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(ids) == list(range(n)) and set(ids.values()) == {1}
    assert all(len(b) <= batch for batches in per_rank for b in batches)
    # Only the last step may be short, and ranks differ there by at most one window.
    for step in range(steps - 1):
        assert {len(batches[step]) for batches in per_rank} == {batch}
    assert max(len(b[-1]) for b in per_rank) - min(len(b[-1]) for b in per_rank) <= 1


def test_uneven_tail_gives_a_rank_an_empty_batch_rather_than_a_repeat():
    per_rank, _ = epoch_batches(9, 4, 2)
    assert [len(b[-1]) for b in per_rank] == [1, 0]


def test_each_epoch_has_its_own_order_and_any_process_recomputes_it():
    (first,), _ = epoch_batches(20, 4, 1, epoch=0)
    (second,), _ = epoch_batches(20, 4, 1, epoch=1)
    (again,), _ = epoch_batches(20, 4, 1, epoch=1)
    assert first != second and second == again


def test_a_resumed_epoch_skips_the_steps_done_then_later_epochs_are_whole():
    (whole,), _ = epoch_batches(20, 4, 1, epoch=2)
    (rest,), (sampler,) = epoch_batches(20, 4, 1, epoch=2, start=3)
    assert rest == whole[3:] and len(sampler) == len(whole), "the length stays the epoch's"
    assert list(sampler) == whole, "the skip applies to the resumed epoch only"
    sampler.set_epoch(2)
    assert list(sampler) == whole
    sampler.start_step = 2
    sampler.set_epoch(3)
    assert len(list(sampler)) == len(whole), "a new epoch starts at its first step"


def test_validation_order_is_the_identity():
    sampler = WindowBatchSampler(5, 2, shuffle=False, seed=0)
    assert list(sampler) == [[0, 1], [2, 3], [4]]


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        WindowBatchSampler(5, 2, shuffle=True, seed=0, num_replicas=2, rank=2)

