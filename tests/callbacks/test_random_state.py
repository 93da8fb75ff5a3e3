"""RandomState: the generators in a checkpoint come back right before the first batch of a resumed run."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from codetune.callbacks.random_state import RandomState


def draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()


def test_round_trip_through_a_weights_only_checkpoint_restores_every_generator():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    buffer = io.BytesIO()
    torch.save({"callbacks": {"RandomState": RandomState().state_dict()}}, buffer)
    expected = draws()
    draws()  # the process goes on drawing after the checkpoint, then dies
    buffer.seek(0)
    resumed = RandomState()
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["callbacks"]["RandomState"])
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    resumed.on_train_batch_start(trainer, None, None, 0)
    assert draws() == expected
    resumed.on_train_batch_start(trainer, None, None, 1)  # only once
    assert draws() != expected


def test_each_rank_gets_its_own_generators_back():
    # Streams that differ per rank: restoring any one rank's state on every rank would show (the end-to-end run
    # under DDP is tests/multiprocess/test_ddp.py::test_a_resume_under_ddp_gives_every_rank_its_own_random_generators_back).
    ranks, expected = [], []
    for seed in (10, 11):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        ranks.append(RandomState().state_dict()["ranks"][0])
        expected.append(draws())
    assert expected[0] != expected[1]
    for rank in (1, 0):
        resumed = RandomState()
        resumed.load_state_dict({"ranks": ranks})
        resumed.on_train_batch_start(SimpleNamespace(world_size=2, global_rank=rank), None, None, 0)
        assert draws() == expected[rank], rank


def test_another_world_size_leaves_the_generators_and_warns():
    state = RandomState().state_dict()
    resumed = RandomState()
    resumed.load_state_dict(state)
    torch.manual_seed(5)
    expected = torch.rand(3).tolist()
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="1 process"):
        resumed.on_train_batch_start(SimpleNamespace(world_size=2, global_rank=0), None, None, 0)
    assert torch.rand(3).tolist() == expected
