"""InterruptCheckpoint without a subprocess: what each signal asks for, the vote at the step boundary, the handlers
put back. tests/test_resume.py sends real signals to a training process and resumes it."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.interrupt import InterruptCheckpoint, InterruptRequest, TrainingInterrupted, resume_hint


def test_first_signal_waits_for_the_step_second_stops_now_later_ones_are_ignored():
    request = InterruptRequest()
    assert not request.requested and request.signum() == signal.SIGTERM  # a rank stopped by another's signal
    assert request.receive(signal.SIGINT) == "at_step_end" and request.requested
    assert request.receive(signal.SIGTERM) == "now"
    assert request.receive(signal.SIGINT) == "ignore"
    assert request.signum() == signal.SIGINT  # the first one names the stop


def test_exit_status_says_which_signal():
    assert TrainingInterrupted(signal.SIGINT, 14, Path("c/last.ckpt")).code == 130
    assert TrainingInterrupted(signal.SIGTERM, 14, None).code == 143
    stopped = TrainingInterrupted(signal.SIGINT, 14, Path("c/last.ckpt"))
    assert str(stopped) == "SIGINT at step 14: checkpoint c/last.ckpt"
    assert str(TrainingInterrupted(signal.SIGTERM, 3, None)) == "SIGTERM at step 3: no checkpoint written"


class FakeTrainer(SimpleNamespace):
    """What the callback reads of the trainer; `others_voted` is the other ranks' flag in the vote."""

    def __init__(self, tmp_path: Path, others_voted: bool = False) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        super().__init__(global_step=0, default_root_dir=str(tmp_path), is_global_zero=True, saved=[],
                         checkpoint_callbacks=[checkpoint],
                         strategy=SimpleNamespace(launcher=None, reduce_boolean_decision=self._vote))
        self.others_voted = others_voted
        self.votes: list[tuple[bool, bool]] = []

    def _vote(self, decision: bool, all: bool = True) -> bool:
        self.votes.append((decision, all))
        return decision or self.others_voted

    def save_checkpoint(self, path) -> None:
        self.saved.append((Path(path), self.global_step))


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
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [] and trainer.votes == [(False, False)]  # nothing asked: training goes on

    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the step in progress finishes
    assert "SIGINT received: stopping after step 14 with a checkpoint" in capfd.readouterr().err
    trainer.global_step = 14
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_batch_end(trainer, None, None, None, 0)
    last = tmp_path / "checkpoints" / "last.ckpt"  # what `--ckpt_path last` resumes from
    assert trainer.saved == [(last, 14)] and trainer.votes[-1] == (True, False)
    assert (stop.value.code, stop.value.step, stop.value.checkpoint) == (130, 14, last)

    callback.on_exception(trainer, None, stop.value)
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers
    assert f"codetune fit --config {tmp_path / 'config.yaml'} --ckpt_path last" in capfd.readouterr().out


def test_another_ranks_signal_stops_this_rank_at_the_same_step(tmp_path, previous_handlers):
    callback, trainer = started(tmp_path, others_voted=True)
    trainer.global_step = 6
    with pytest.raises(TrainingInterrupted) as stop:
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [(tmp_path / "checkpoints" / "last.ckpt", 6)] and stop.value.code == 143


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, previous_handlers, capfd):
    callback, trainer = started(tmp_path)
    trainer.global_step = 3
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        signal.raise_signal(signal.SIGINT)
    assert (stop.value.code, stop.value.step, stop.value.checkpoint) == (130, 3, None)  # the signal that stopped it
    assert trainer.saved == []
    callback.on_exception(trainer, None, stop.value)
    assert "no checkpoint to resume from" in capfd.readouterr().out  # none written before either
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers


def test_training_that_ends_puts_the_handlers_back(tmp_path, previous_handlers):
    callback, trainer = started(tmp_path)
    assert signal.getsignal(signal.SIGINT) == callback._on_signal
    callback.on_train_end(trainer, None)
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers


def test_without_a_model_checkpoint_signals_keep_their_usual_effect(tmp_path, previous_handlers):
    callback, trainer = InterruptCheckpoint(), FakeTrainer(tmp_path)
    trainer.checkpoint_callbacks = []
    with pytest.warns(UserWarning, match="no ModelCheckpoint"):
        callback.setup(trainer, None, "fit")
    callback.on_train_start(trainer, None)
    assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers


def test_resume_hint_names_the_config_and_the_make_target(tmp_path):
    hint = resume_hint(tmp_path / "runs" / "r", tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt")
    run = tmp_path / "runs" / "r"
    assert f"codetune fit --config {run / 'config.yaml'} --ckpt_path last" in hint
    assert f"make resume RUN={run}" in hint
