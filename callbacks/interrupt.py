"""Ctrl-C and SIGTERM during training: a checkpoint at the next optimizer step, then a clean stop."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from typing_extensions import override

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal. A SystemExit (as Lightning's own SIGTERMException) whose code is the shell's
    convention for a process ended by a signal, 128 + its number (130 for SIGINT, 143 for SIGTERM); Lightning
    passes it through `on_exception` to the callbacks and re-raises it, and Python exits with that status.

    `checkpoint` is the file a resume continues from, written at `step`; None when a second signal stopped the run
    at once, between two steps."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint written"
        return f"{self.signal_name} at step {self.step}: {where}"


class InterruptRequest:
    """The signals received during training and what each one asks for: the first, a stop with a checkpoint at the
    next step boundary; the second, a stop at once; any later one nothing (the run is already stopping)."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def receive(self, signum: int) -> str:
        """Records `signum`; returns `"at_step_end"`, `"now"` or `"ignore"`."""
        self.signals.append(signum)
        return {1: "at_step_end", 2: "now"}.get(len(self.signals), "ignore")

    def signum(self) -> int:
        # A rank that got nothing stops because another rank did: SIGTERM is the conventional "asked to stop".
        return self.signals[0] if self.signals else int(signal.SIGTERM)


class InterruptCheckpoint(Callback):
    """Makes Ctrl-C (SIGINT) and SIGTERM during training stop the run at the next optimizer-step boundary with a
    checkpoint that resumes it exactly, instead of losing every step since the last periodic checkpoint.

    From the first training step to the end of training the callback handles both signals (the previous handlers
    are put back when training ends or fails). The first signal only sets a flag, and prints that the run will stop.
    At the end of the optimizer step in progress (``on_train_batch_end``) every rank votes through
    ``trainer.strategy.reduce_boolean_decision`` (under DDP a signal to any rank stops all of them at the same
    step); then ``checkpoints/last.ckpt`` is written (``trainer.save_checkpoint``, through the atomic CheckpointIO:
    the file ``--ckpt_path last`` resumes from) and :class:`TrainingInterrupted` is raised, so no validation, no
    generation eval and no epoch-end checkpoint of the unfinished epoch runs. The manifest marks the training phase,
    the segment and the run ``interrupted`` (``callbacks/manifest.py``), the console shows the resume command, and
    the process exits with status 130 (SIGINT) or 143 (SIGTERM).

    A second signal while the step finishes stops the run at once, without a checkpoint: the manifest says so, and
    a resume starts from the last periodic checkpoint (``--checkpoint_every_n_steps``), if any. Later signals are
    ignored while the run shuts down.

    During training this replaces Lightning's own SIGTERM handler, which would run the epoch's validation, raise
    ``SIGTERMException`` (exit status 0, as if the run had succeeded) and write no checkpoint. Outside training
    (loading the model, exporting the adapter) a signal has its usual effect.

    Raises:
        TrainingInterrupted: at the step boundary after a signal, or at once after a second one.

    Example::

        codetune fit --config configs/training_config.yaml --data.repo ../myrepo   # Ctrl-C at step 14:
        # codetune ■ phase_4_training    41.20 s  SIGINT at step 14: checkpoint runs/<run>/checkpoints/last.ckpt
        # codetune: resume with: codetune fit --config runs/<run>/config.yaml --ckpt_path last
    """

    def __init__(self) -> None:
        self.request = InterruptRequest()
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._checkpoint: Path | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if callback is None:
            rank_zero_warn("codetune: no ModelCheckpoint, so Ctrl-C and SIGTERM stop training without a checkpoint; "
                           "keep checkpointing on (the default) for an interrupted run to resume.")
            return
        self._checkpoint = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in setup: Lightning installs its SIGTERM handler just before the training stage starts.
        if self._checkpoint is None or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (a notebook's worker thread is not)
        self.request = InterruptRequest()
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        action = self.request.receive(signum)
        step = self._trainer.global_step if self._trainer is not None else 0
        name = signal.Signals(signum).name
        if action == "at_step_end":
            # os.write, not print: a handler runs between two bytecodes, maybe inside a print to the same stream.
            _write_stderr(f"\ncodetune: {name} received: stopping after step {step + 1} with a checkpoint "
                          f"(again to stop at once, without one)\n")
        elif action == "now":
            raise TrainingInterrupted(signum, step, checkpoint=None)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # One optimizer step is one batch (manual optimization): its end is a step boundary on every rank.
        if self._checkpoint is None or not trainer.strategy.reduce_boolean_decision(self.request.requested,
                                                                                    all=False):
            return
        trainer.save_checkpoint(self._checkpoint)
        raise TrainingInterrupted(self.request.signum(), trainer.global_step, checkpoint=self._checkpoint)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, TrainingInterrupted):
            return
        launcher = trainer.strategy.launcher
        if exception.checkpoint is None and isinstance(launcher, _SubprocessScriptLauncher):
            # Stopped between two steps: the other ranks wait in a collective this rank never reaches.
            launcher.kill(signal.SIGKILL)
        if trainer.is_global_zero:
            Console(highlight=False, soft_wrap=True).print(
                resume_hint(Path(trainer.default_root_dir), exception.checkpoint or _existing(self._checkpoint)))

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def resume_hint(run_dir: Path, checkpoint: Path | None) -> str:
    """What the user runs next: the resume command when a checkpoint exists, otherwise a fresh start."""
    config = run_dir / "config.yaml"
    if checkpoint is None:
        return f"codetune: no checkpoint to resume from; train again with: codetune fit --config {config}"
    return (f"codetune: resume with: codetune fit --config {config} --ckpt_path last   "
            f"(or: make resume RUN={run_dir})")


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def _write_stderr(text: str) -> None:
    os.write(2, text.encode("utf-8", "replace"))
