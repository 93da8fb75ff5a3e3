"""The data module's checkpointed position: where a resumed run's first epoch starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from codetune.data.datamodule import CodeDataModule


def fake_trainer(epoch: int, steps_done: int, world_size: int = 1, rank: int = 0) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=steps_done))
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from helpers import write_fixture_repo

    tmp = tmp_path_factory.mktemp("position")
    repo = write_fixture_repo(tmp / "repo")
    module = CodeDataModule(repo=str(repo), seq_len=64, batch_size=2, gradient_accumulation_steps=2,
                            cache_dir=str(tmp / "cache"))
    module.setup("fit")
    return module


def batches(module: CodeDataModule) -> list[list[int]]:
    return [b["sample_ids"].tolist() for b in module.train_dataloader()]


def test_state_round_trips_and_the_resumed_epoch_continues_after_the_steps_done(prepared):
    prepared.trainer = fake_trainer(epoch=1, steps_done=2)
    state = prepared.state_dict()
    assert prepared.fim_records, "the tiny tokenizer has FIM tokens, so the default trains FIM samples"
    assert state == {"epoch": 1, "steps_done": 2, "train_windows": 14, "optimizer_batch_size": 4, "world_size": 1,
                     "fim_samples": len(prepared.fim_records), "vocabulary": prepared.vocabulary}
    loader = prepared.train_dataloader()
    loader.sampler.set_epoch(1)
    whole = [b["sample_ids"].tolist() for b in loader]
    prepared.load_state_dict(state)
    assert batches(prepared) == whole[2:]
    again = prepared.train_dataloader().sampler
    assert (again.epoch, again.start_step) == (0, 0), "the position applies to the first loader only"


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_the_next(prepared):
    prepared.trainer = fake_trainer(epoch=0, steps_done=4)
    prepared.load_state_dict(prepared.state_dict())
    loader = prepared.train_dataloader()
    assert loader.sampler.epoch == 1 and loader.sampler.start_step == 0


def test_different_data_at_resume_is_said_not_hidden(prepared):
    prepared.trainer = fake_trainer(epoch=0, steps_done=1)
    prepared.load_state_dict({**prepared.state_dict(), "train_windows": 20})
    with pytest.warns(UserWarning, match="train_windows 20 -> 14"):
        prepared.train_dataloader()


def test_each_rank_loads_its_own_share(prepared):
    shares, val_shares = [], []
    for rank in (0, 1):
        prepared.trainer = fake_trainer(epoch=0, steps_done=0, world_size=2, rank=rank)
        shares.append([i for b in batches(prepared) for i in b])
        val_shares.append([i for b in prepared.val_dataloader() for i in b["sample_ids"].tolist()])
    assert sorted(shares[0] + shares[1]) == list(range(14)) and not set(shares[0]) & set(shares[1])
    # The held-out loss sums the ranks' validation shares: together they are every window once.
    assert sorted(val_shares[0] + val_shares[1]) == list(range(len(prepared.val_windows)))
    assert not set(val_shares[0]) & set(val_shares[1])
