"""InterruptCheckpoint without a subprocess: what each signal asks for, the vote at the step boundary, the handlers
put back. tests/multiprocess/test_resume.py sends real signals to a training process and resumes it."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from codetune.callbacks.interrupt import InterruptCheckpoint, InterruptRequest, TrainingInterrupted, stop_line
from codetune.run.checkpoint_io import AtomicCheckpointIO


def test_in_a_step_the_first_signal_waits_the_second_stops_now_later_ones_are_ignored():
    request = InterruptRequest()
    assert not request.requested and request.signum() == signal.SIGTERM  # a rank stopped by another's signal
    assert request.receive(signal.SIGINT, in_step=True) == "at_step_end" and request.requested
    assert request.receive(signal.SIGTERM, in_step=True) == "now"
    assert request.receive(signal.SIGINT, in_step=True) == "ignore"
    assert request.signum() == signal.SIGINT  # the first one names the stop


def test_outside_a_step_the_first_signal_stops_now():
    request = InterruptRequest()
    assert request.receive(signal.SIGTERM, in_step=False) == "now"
    assert request.receive(signal.SIGTERM, in_step=False) == "ignore"


def test_exit_status_says_which_signal():
    assert TrainingInterrupted(signal.SIGINT, 14, Path("c/last.ckpt")).code == 130
    assert TrainingInterrupted(signal.SIGTERM, 14, None).code == 143
    stopped = TrainingInterrupted(signal.SIGINT, 14, Path("c/last.ckpt"))
    assert str(stopped) == "SIGINT during training at step 14: checkpoint c/last.ckpt"
    assert str(TrainingInterrupted(signal.SIGTERM, 0, None, where="while tokenizing")) == \
        "SIGTERM while tokenizing at step 0: no checkpoint written"


class FakeTrainer(SimpleNamespace):
    """What the callback reads of the trainer; `others_voted` is the other ranks' flag in the vote."""

    def __init__(self, tmp_path: Path, others_voted: bool = False) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        super().__init__(global_step=0, default_root_dir=str(tmp_path), is_global_zero=True, saved=[],
                         checkpoint_callbacks=[checkpoint], datamodule=None, world_size=1, ckpt_path=None,
                         sanity_checking=False, num_training_batches=100, should_stop=False, max_steps=-1,
                         strategy=SimpleNamespace(launcher=None, reduce_boolean_decision=self._vote,
                                                  checkpoint_io=AtomicCheckpointIO()))
        self.others_voted = others_voted
        self.votes: list[tuple[bool, bool]] = []

    def _vote(self, decision: bool, all: bool = True) -> bool:
        self.votes.append((decision, all))
        return decision or self.others_voted

    def save_checkpoint(self, path) -> None:
        self.saved.append((Path(path), self.global_step))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("checkpoint")
        for listener in self.strategy.checkpoint_io.listeners:  # as the atomic CheckpointIO confirms a write
            listener(Path(path), self.global_step)


@pytest.fixture
def previous_handlers():
    """The test process's own handlers, put back whatever the test does."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def started(tmp_path: Path, others_voted: bool = False) -> tuple[InterruptCheckpoint, FakeTrainer]:
    callback, trainer = InterruptCheckpoint(), FakeTrainer(tmp_path, others_voted)
    callback.setup(trainer, None, "fit")
    callback.on_train_start(trainer, None)
    return callback, trainer


def test_a_signal_stops_at_the_next_step_boundary_with_a_checkpoint(tmp_path, previous_handlers, capfd):
    callback, trainer = started(tmp_path)
    trainer.global_step = 13
    callback.on_train_batch_start(trainer, None, None, 0)
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [] and trainer.votes == [(False, False)]  # nothing asked: training goes on

    callback.on_train_batch_start(trainer, None, None, 0)
    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the step in progress finishes
    assert "SIGINT received: stopping after step 14 with a checkpoint" in capfd.readouterr().err
    trainer.global_step = 14
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_batch_end(trainer, None, None, None, 0)
    last = tmp_path / "checkpoints" / "last.ckpt"  # what `--ckpt_path last` resumes from
    assert trainer.saved == [(last, 14)] and trainer.votes[-1] == (True, False)
    assert (stop.value.code, stop.value.step, stop.value.checkpoint) == (130, 14, last)

    callback.on_exception(trainer, None, stop.value)
    callback.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers
    err = capfd.readouterr().err
    assert f"SIGINT during training, at step 14: kept {last} (step 14)" in err
    assert f"Continue with: codetune fit --config {tmp_path / 'config.yaml'} --ckpt_path last" in err


def test_another_ranks_signal_stops_this_rank_at_the_same_step(tmp_path, previous_handlers):
    callback, trainer = started(tmp_path, others_voted=True)
    trainer.global_step = 6
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [(tmp_path / "checkpoints" / "last.ckpt", 6)] and stop.value.code == 143


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, previous_handlers, capfd):
    callback, trainer = started(tmp_path)
    trainer.global_step = 3
    callback.on_train_batch_start(trainer, None, None, 0)
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        signal.raise_signal(signal.SIGINT)
    assert (stop.value.code, stop.value.step, stop.value.checkpoint) == (130, 3, None)  # the signal that stopped it
    callback.on_exception(trainer, None, stop.value)
    assert trainer.saved == []  # mid-step weights are no step's: never saved
    assert "no checkpoint holds its steps" in capfd.readouterr().err
    callback.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_signal_during_validation_stops_at_once_and_saves_the_unsaved_steps(tmp_path, previous_handlers, capfd,
                                                                              world_size):
    callback, trainer = started(tmp_path)
    trainer.world_size = world_size
    trainer.global_step = 4
    callback.on_validation_start(trainer, None)
    with pytest.raises(TrainingInterrupted) as stop:
        signal.raise_signal(signal.SIGTERM)
    assert stop.value.where == "during validation"
    callback.on_exception(trainer, None, stop.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    err = capfd.readouterr().err
    if world_size == 1:  # the weights are step 4's, at a step boundary: kept
        assert trainer.saved == [(last, 4)] and stop.value.checkpoint == last
        assert f"SIGTERM during validation, at step 4: kept {last} (step 4)" in err
    else:  # the other ranks cannot join the save
        assert trainer.saved == [] and "no checkpoint holds its steps" in err
    callback.teardown(trainer, None, "fit")


def test_a_signal_after_a_checkpoint_of_this_step_saves_nothing_more(tmp_path, previous_handlers, capfd):
    callback, trainer = started(tmp_path)
    trainer.global_step = 4
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # the step's periodic checkpoint
    callback.on_train_epoch_end(trainer, None)
    with pytest.raises(TrainingInterrupted) as stop:
        signal.raise_signal(signal.SIGINT)
    callback.on_exception(trainer, None, stop.value)
    assert len(trainer.saved) == 1 and stop.value.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert "SIGINT during the epoch's evaluation, at step 4: kept" in capfd.readouterr().err
    callback.teardown(trainer, None, "fit")


def test_the_handlers_stay_until_teardown_then_go_back(tmp_path, previous_handlers):
    callback, trainer = started(tmp_path)
    assert signal.getsignal(signal.SIGINT) == callback._on_signal
    callback.on_train_end(trainer, None)
    assert signal.getsignal(signal.SIGINT) == callback._on_signal  # the final checkpoint and the export are covered
    callback.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers


def test_without_a_model_checkpoint_a_signal_still_stops_the_run_cleanly(tmp_path, previous_handlers):
    callback, trainer = InterruptCheckpoint(), FakeTrainer(tmp_path)
    trainer.checkpoint_callbacks = []
    with pytest.warns(UserWarning, match="no ModelCheckpoint"):
        callback.setup(trainer, None, "fit")
    callback.on_train_start(trainer, None)
    callback.on_train_batch_start(trainer, None, None, 0)
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert stop.value.checkpoint is None and trainer.saved == []
    callback.teardown(trainer, None, "fit")


def test_the_stop_line_says_what_was_kept_and_what_continues(tmp_path):
    run = tmp_path / "runs" / "r"
    never = stop_line(TrainingInterrupted(signal.SIGTERM, 0, None, where="while tokenizing"), run, (None, None))
    assert never == (f"codetune: SIGTERM while tokenizing, at step 0: no step was trained; kept {run / 'config.yaml'} "
                     f"and the manifest. Start it again with: codetune fit --config {run / 'config.yaml'} "
                     f"--ckpt_path last")
    older = stop_line(TrainingInterrupted(signal.SIGINT, 9, None), run, (run / "checkpoints" / "last.ckpt", 5))
    assert "kept " + str(run / "checkpoints" / "last.ckpt") + " (step 5); steps 6-9 were not saved." in older


def test_the_last_step_of_an_epoch_or_of_the_run_is_checkpointed_before_its_validation(tmp_path, previous_handlers):
    callback, trainer = started(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    trainer.num_training_batches, trainer.global_step = 4, 3
    callback.on_train_batch_end(trainer, None, None, None, 2)
    assert trainer.saved == []
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, None, None, 3)  # the epoch's last batch
    trainer.global_step, trainer.max_steps = 6, 6
    callback.on_train_batch_end(trainer, None, None, None, 1)  # the run's last step, mid-epoch
    assert trainer.saved == [(last, 4), (last, 6)]
    callback.teardown(trainer, None, "fit")


def test_a_signal_waiting_for_a_step_that_will_not_come_stops_the_run_where_it_leaves_its_steps(tmp_path,
                                                                                                previous_handlers):
    callback, trainer = started(tmp_path)
    trainer.global_step = 5
    callback.on_validation_end(trainer, None)  # the final validation ended: back "in the steps" until the epoch ends
    signal.raise_signal(signal.SIGTERM)  # waits for a step's end
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_epoch_end(trainer, None)  # no step comes: it stops here
    assert stop.value.where == "during the epoch's evaluation" and stop.value.code == 143
    callback.teardown(trainer, None, "fit")
