"""Ctrl-C and SIGTERM at any moment of a run: a checkpoint when training had advanced, then a clean stop."""

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

from codetune.run.checkpoint_io import listen_to_saves
from codetune.storage import CONFIG_NAME
from codetune.run.manifest import resume_command

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal. A SystemExit (as Lightning's own SIGTERMException) whose code is the shell's
    convention for a process ended by a signal, 128 + its number (130 for SIGINT, 143 for SIGTERM); Lightning
    passes it through `on_exception` to the callbacks and re-raises it, and Python exits with that status.

    `where` is what the run was doing; `checkpoint` the file a resume continues from, holding `step` (None: no
    checkpoint holds the weights of `step`, because no step was trained or the second signal did not wait)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, where: str = "during training") -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint
        self.where = where

    def __str__(self) -> str:
        kept = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint written"
        return f"{self.signal_name} {self.where} at step {self.step}: {kept}"


class InterruptRequest:
    """The signals received and what each one asks for. During a training step: the first, a stop with a checkpoint
    at the step's end; the second, a stop at once. Anywhere else, the first stops at once. Once the run is stopping,
    every later signal is ignored."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.stopping = False

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def receive(self, signum: int, in_step: bool) -> str:
        """Records `signum`; returns `"at_step_end"`, `"now"` or `"ignore"`."""
        self.signals.append(signum)
        if self.stopping:
            return "ignore"
        if in_step and len(self.signals) == 1:
            return "at_step_end"
        self.stopping = True
        return "now"

    def signum(self) -> int:
        # A rank that got nothing stops because another rank did: SIGTERM is the conventional "asked to stop".
        return self.signals[0] if self.signals else int(signal.SIGTERM)


class InterruptCheckpoint(Callback):
    """Makes Ctrl-C (SIGINT) and SIGTERM stop a run within seconds at any moment (the scan, tokenization, model
    load, base evaluation, training, validation, the epoch evaluation, the export) with what was trained kept, one
    line saying where it stopped, what was kept and the command that continues, and a manifest marked
    ``interrupted`` (``callbacks/manifest.py``). The process exits with status 130 (SIGINT) or 143 (SIGTERM).

    ``codetune fit`` installs the handlers before it scans the repository (`install`); used without the CLI, the
    callback installs them when Lightning calls its ``setup``. They are put back when the run ends.

    - **During an optimizer step**, the first signal only sets a flag and prints that the run will stop. At the end
      of the step every rank votes through ``trainer.strategy.reduce_boolean_decision`` (under DDP a signal to any
      rank stops all of them at the same step); ``checkpoints/last.ckpt`` is written (``trainer.save_checkpoint``,
      through the atomic CheckpointIO: the file ``--ckpt_path last`` resumes from) and :class:`TrainingInterrupted`
      is raised, so no validation, no generation eval and no epoch-end checkpoint of the unfinished epoch runs. A
      second signal while the step finishes stops the run at once, without that checkpoint.
    - **Anywhere else** the run stops at once. When steps were trained since the last checkpoint (a signal during
      validation or the epoch's evaluation), the weights are at a step boundary, so a one-process run writes them
      to ``last.ckpt`` before it exits; a resume finishes the interrupted validation. Under DDP the other ranks
      cannot join that save, so the run keeps its last periodic checkpoint (``--checkpoint_every_n_steps``).
    - Once the run is stopping, later signals are ignored.

    It also writes ``last.ckpt`` at the end of each epoch's last step and of the run's last step, before their
    validation and evaluations. A checkpoint written after them (Lightning's own at an epoch's end) does not resume
    exactly: restored from it, Lightning 2.6 calls ``set_epoch`` one too high before the next pass, which then trains
    another epoch's order than the uninterrupted run; one written at the step boundary does. A stop during the
    validation or the evaluation that follows keeps that checkpoint, whose weights are the current ones.

    During training this replaces Lightning's own SIGTERM handler, which would run the epoch's validation, raise
    ``SIGTERMException`` (exit status 0, as if the run had succeeded) and write no checkpoint.

    Raises:
        TrainingInterrupted: at the step boundary after a signal, or at once outside a step or after a second one.

    Example::

        codetune fit --config configs/training_config.yaml --data.repo ../myrepo   # Ctrl-C at step 14:
        # codetune: SIGINT during training at step 14: kept runs/<run>/checkpoints/last.ckpt (step 14). Continue with:
        #   codetune fit --config runs/<run>/config.yaml --ckpt_path last
    """

    def __init__(self) -> None:
        self.request = InterruptRequest()
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._checkpoint: Path | None = None
        self._in_step = False
        self._saved_step: int | None = None
        """Global step of the newest checkpoint known to be whole on disk (None: none yet)."""
        self._where = "before training"

    # -- the handlers -------------------------------------------------------------------------------

    def install(self, trainer: L.Trainer) -> None:
        """Handle SIGINT and SIGTERM for `trainer`'s run from now on (main thread only: a notebook's worker thread
        cannot set handlers; there a signal keeps its usual effect)."""
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        action = self.request.receive(signum, self._in_step)
        step = self._trainer.global_step if self._trainer is not None else 0
        name = signal.Signals(signum).name
        if action == "at_step_end":
            # os.write, not print: a handler runs between two bytecodes, maybe inside a print to the same stream.
            _write_stderr(f"\ncodetune: {name} received: stopping after step {step + 1} with a checkpoint "
                          f"(again to stop at once, without one)\n")
        elif action == "now":
            raise TrainingInterrupted(signum, step, checkpoint=None, where=self.where())

    def where(self) -> str:
        """What the run is doing, as the stop line says it."""
        if self._where == "before training" and self._trainer is not None:
            preparing = self._trainer.datamodule.preparing
            return {"phase_1_scan": "while scanning the repository",
                    "phase_2_tokenize": "while tokenizing"}.get(preparing, "while loading the model")
        return self._where

    # -- where the run is -----------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self._previous:
            self.install(trainer)
        self._trainer = trainer
        listen_to_saves(trainer, self._saved)
        callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if callback is None:
            rank_zero_warn("codetune: no ModelCheckpoint, so Ctrl-C and SIGTERM stop training without a checkpoint; "
                           "keep checkpointing on (the default) for an interrupted run to resume.")
            return
        self._checkpoint = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"

    def _saved(self, path: Path, step: int) -> None:
        self._saved_step = step

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._where = "before the next step" if trainer.ckpt_path else "before the first step"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run's weights are those of the checkpoint it loaded.
        self._saved_step = trainer.global_step if trainer.ckpt_path else None
        self._where = "during the base model's evaluation" if trainer.global_step == 0 else "before the next step"
        # Again here: Lightning installs its SIGTERM handler just before the training stage starts.
        self.install(trainer)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stepping()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stepping()

    def _stepping(self) -> None:
        """From an epoch's start, and from each step's end to the next one (fetching the batch, the batch-start
        hooks of every callback), the run is in its steps: a first signal waits for the next step's end."""
        self._in_step, self._where = True, "during training"

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # One optimizer step is one batch (manual optimization): its end is a step boundary on every rank.
        requested = trainer.strategy.reduce_boolean_decision(self.request.requested, all=False)
        if not requested:
            if self._checkpoint is not None and _ends_an_epoch_or_the_run(trainer, batch_idx):
                trainer.save_checkpoint(self._checkpoint)
            self._stepping()
            return
        self._in_step = False
        self.request.stopping = True
        if self._checkpoint is not None:
            trainer.save_checkpoint(self._checkpoint)
        raise TrainingInterrupted(self.request.signum(), trainer.global_step, checkpoint=self._checkpoint)

    def _leave_steps(self, trainer: L.Trainer, where: str) -> None:
        """The run leaves its steps for `where`: a signal that waited for a step's end that will not come now
        stops it here."""
        self._in_step, self._where = False, where
        if self.request.requested and not self.request.stopping:
            self.request.stopping = True
            raise TrainingInterrupted(self.request.signum(), trainer.global_step, checkpoint=None, where=where)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._leave_steps(trainer, "during validation")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stepping()  # back to the steps (a validation inside an epoch), or on to the epoch's end

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave_steps(trainer, "during the epoch's evaluation")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave_steps(trainer, "while saving the final checkpoint and the adapter")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    # -- the stop -------------------------------------------------------------------------------------

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.request.stopping = True  # nothing interrupts the shutdown
        if not isinstance(exception, TrainingInterrupted):
            return
        if exception.checkpoint is None:
            exception.checkpoint = self._checkpoint_now(trainer)
        launcher = trainer.strategy.launcher
        if exception.checkpoint is None and isinstance(launcher, _SubprocessScriptLauncher):
            # Stopped outside a step boundary: the other ranks wait in a collective this rank never reaches.
            launcher.kill(signal.SIGKILL)
        if trainer.is_global_zero:
            Console(highlight=False, soft_wrap=True, stderr=True).print(
                stop_line(exception, Path(trainer.default_root_dir), self._kept(exception)))

    def _checkpoint_now(self, trainer: L.Trainer) -> Path | None:
        """A checkpoint holding the weights as they are, when they are a step's and newer than the last one on
        disk (one process only); the last one when it is current; None otherwise."""
        current = self._saved_step == trainer.global_step and self._saved_step is not None
        if current or self._checkpoint is None or self._in_step or trainer.global_step == 0:
            return _existing(self._checkpoint) if current else None
        if trainer.world_size > 1:
            return None
        trainer.save_checkpoint(self._checkpoint)
        return self._checkpoint

    def _kept(self, exception: TrainingInterrupted) -> tuple[Path | None, int | None]:
        """The checkpoint a resume starts from, and its step (None, None: there is none)."""
        if exception.checkpoint is not None:
            return exception.checkpoint, exception.step
        if self._saved_step is not None and _existing(self._checkpoint):
            return self._checkpoint, self._saved_step
        return None, None


def _ends_an_epoch_or_the_run(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the step that just ended is its epoch's last or the run's (by --trainer.max_steps, or asked to stop:
    the manifest callback asks at max_steps, so that the final weights are validated)."""
    return (batch_idx + 1 >= trainer.num_training_batches or trainer.should_stop
            or 0 < trainer.max_steps <= trainer.global_step)


def stop_line(exception: TrainingInterrupted, run_dir: Path, kept: tuple[Path | None, int | None]) -> str:
    """The one line an interrupted run ends with: where it stopped, what was kept, the command that continues."""
    checkpoint, step = kept
    stopped = f"codetune: {exception.signal_name} {exception.where}, at step {exception.step}"
    if checkpoint is not None:
        lost = f"; steps {step + 1}-{exception.step} were not saved" if step is not None and step < exception.step else ""
        return f"{stopped}: kept {checkpoint} (step {step}){lost}. Continue with: {resume_command(run_dir)}"
    nothing = "no step was trained" if exception.step == 0 else "no checkpoint holds its steps"
    return (f"{stopped}: {nothing}; kept {run_dir / CONFIG_NAME} and the manifest. Start it again with: "
            f"{resume_command(run_dir)}")


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def _write_stderr(text: str) -> None:
    os.write(2, text.encode("utf-8", "replace"))
