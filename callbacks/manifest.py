"""Run manifest and adapter export."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.markup import escape
from typing_extensions import override

from codetune.callbacks.generation_eval import GenerationEval
from codetune.callbacks.interrupt import TrainingInterrupted
from codetune.memory.allocator import allocator_record
from codetune.run.checkpoint_io import listen_to_saves
from codetune.errors import ConfigError, DiskFullError
from codetune.storage import ADAPTER_DIR, MANIFEST_NAME, utc_now
from codetune.run.manifest import Manifest, git_commit, package_versions
from codetune.run.directory import relative_to_run

SHOWN_BEFORE_TRAINING = ("phase_1_scan", "phase_2_tokenize", "phase_3_model")


class ManifestWriter(Callback):
    """Writes the run's MANIFEST.json through every phase and exports the LoRA adapter at the end.

    The run directory is the trainer's ``default_root_dir`` (the CLI sets it to ``runs/<run_name>``).
    Rank zero alone writes. Phases recorded under ``phase_results``:

    - ``phase_1_scan`` / ``phase_2_tokenize``: the data module's report (files kept and skipped by
      reason, secrets redacted, tokens and windows per split, packing efficiency, wall times);
    - ``phase_3_model``: base model and ``base_revision`` (what it was when loaded: the commit of a
      hub id, the fingerprint of a local directory; ``codetune/model/revision.py``), quantization,
      dtype, gradient checkpointing, fully trained layers, trainable and total parameters, and
      ``cuda_allocator`` (the allocator variable torch reads, its value, whether expandable segments
      are on and who chose them: ``codetune/memory/allocator.py``);
    - ``phase_4_training``: ``training_stats`` with ``final_train_loss``, ``final_val_loss``,
      ``final_perplexity``, optimizer steps, epochs, tokens trained; plus what any other callback
      returns from a ``manifest_results()`` method (``oom_backoffs``, ``peak_vram_gb``...);
    - ``phase_5_evaluation`` and any other phase a callback returns from ``manifest_phases()``
      (the generation eval: base and tuned metrics, deltas);
    - ``phase_6_export``: the adapter directory (peft ``save_pretrained``, safetensors).

    Top level: ``run_name``, ``status``, ``training_time_minutes``, ``started_at``,
    ``finished_at``, ``repo``, ``repo_git_commit``, ``versions``, ``config`` (the resolved CLI
    config, when the CLI saved one), ``segments`` (one per training process: the first and each
    resume, with ``resumed_from``, ``start_step``, ``end_step``, ``training_minutes``, ``status``;
    brought up to date each time a checkpoint is whole on disk, so a killed segment shows where a resume starts:
    ``last_checkpoint`` and ``end_step`` name a checkpoint that exists, never one whose write failed).
    Every path recorded is relative to the run directory, so the run can be moved.
    ``training_time_minutes``, each segment's ``training_minutes`` and ``phase_4_training``'s ``wall_s`` are
    training time: the steps and the validation, not the generation eval (before the first step and at each
    epoch end), whose seconds ``phase_5_evaluation`` holds.
    A failure marks the running phase and segment ``failed`` with the error; Ctrl-C or SIGTERM
    (``callbacks/interrupt.py``) and a full disk mark them, and the run, ``interrupted``, naming the step and the
    checkpoint a resume starts from. A run that trained no optimizer step (``--trainer.max_epochs 0``, or
    ``--trainer.limit_train_batches 0``) is refused at its end: its adapter would be the untrained one.

    The console shows each phase as it ends (status, wall time, its key figures); Lightning's rich
    progress bar shows the training itself.

    Example::

        jq .phase_results.phase_4_training.training_stats.final_train_loss runs/demo/MANIFEST.json
    """

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.tokens_trained = 0
        self._train_started = 0.0
        self._eval_s_at_start = 0.0
        self._start_step = 0
        self._final_minutes: float | None = None
        self._pending_minutes = 0.0
        self._train_loss: float | None = None
        self._trainer: L.Trainer | None = None
        self._console = Console(highlight=False, soft_wrap=True)
        self._prepared_shown = False

    @property
    def run_dir(self) -> Path:
        return Path(self._trainer.default_root_dir)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit" or not trainer.is_global_zero:
            return
        self.manifest = begin_manifest(self.run_dir)
        datamodule = trainer.datamodule
        repo = Path(datamodule.repo).resolve()
        self.manifest.update(repo=str(repo), repo_git_commit=git_commit(repo), versions=package_versions())
        self._record_prepared(datamodule)
        self.manifest.start_phase("phase_3_model")
        listen_to_saves(trainer, self._checkpoint_saved)

    def _record_prepared(self, datamodule: Any) -> None:
        """The data module's phases that ended (the scan, the tokenization), once."""
        if self._prepared_shown:
            return
        for phase, results in datamodule.report.items():
            self.manifest.finish_phase(phase, {k: v for k, v in results.items() if k != "wall_s"},
                                       wall_s=results.get("wall_s", 0.0))
            self._show(phase)
            self._prepared_shown = True

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.manifest is None:
            return
        config_path = self.run_dir / "config.yaml"
        if config_path.exists():
            self.manifest.update(config=yaml.safe_load(config_path.read_text(encoding="utf-8")))
        trainable, total = pl_module.model.get_nb_trainable_parameters()
        base = pl_module.causal_lm
        self.manifest.finish_phase("phase_3_model", {
            "name_or_path": pl_module.hparams.name_or_path,
            # Set by the module when it loads the base; `generate` and `merge` load or check against it.
            "base_revision": pl_module.base_revision,
            "architecture": type(base).__name__,
            "quantized_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
            "dtype": str(base.dtype).replace("torch.", ""),
            "gradient_checkpointing": bool(base.is_activation_checkpointing),
            "modules_to_save": list(pl_module.hparams.modules_to_save),
            "optimizer": pl_module.optimizer_name,
            "attention": pl_module.attention_plan.record() if pl_module.attention_plan else None,
            "float16_residual_scaling": pl_module.float16_scaling.manifest() if pl_module.float16_scaling else None,
            "vram_plan": pl_module.vram_plan,
            # The configuration torch's CUDA allocator reads from the environment (codetune/memory/allocator.py).
            "cuda_allocator": allocator_record(),
            "trainable_parameters": trainable,
            "total_parameters": total,
        })
        self._show("phase_3_model")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started, self._final_minutes = time.perf_counter(), None
        self._start_step = trainer.global_step
        # A resumed run's eval history (in the checkpoint) holds earlier segments' evals: only what follows counts.
        self._eval_s_at_start = _eval_seconds(trainer)
        if self.manifest is not None:
            self.manifest.start_phase("phase_4_training")
            # The checkpoint is known (and loaded) by now; without one, earlier segments were another run.
            self.manifest.start_segment(resumed_from=self._resumed_from(trainer))
            self.manifest.update_segment(start_step=trainer.global_step, end_step=trainer.global_step,
                                         training_minutes=0.0)
            resumed = f" (resumed at step {trainer.global_step})" if trainer.ckpt_path else ""
            self._console.print(f"[bold]codetune[/] [cyan]…[/] phase_4_training{resumed}")

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The segment's time as the checkpoint holds it; recorded once the file is whole (_checkpoint_saved).
        self._pending_minutes = self._training_minutes(trainer)

    def _resumed_from(self, trainer: L.Trainer) -> str | None:
        """The checkpoint this process resumed from, relative to the run (None: a fresh start)."""
        return relative_to_run(trainer.ckpt_path, self.run_dir) if trainer.ckpt_path else None

    def _checkpoint_saved(self, path: Path, step: int) -> None:
        """What a later resume will start from: if this process is killed, its segment ends here."""
        if self.manifest is not None and self.manifest.segments:
            self.manifest.update_segment(end_step=step, last_checkpoint=relative_to_run(path, self.run_dir),
                                         last_checkpoint_at=utc_now(), training_minutes=self._pending_minutes)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch["input_ids"].numel()
        if trainer.world_size > 1:
            # Every rank ends every step; the manifest counts the tokens of all ranks (their batches can differ).
            tokens = trainer.strategy.reduce(torch.tensor(tokens, device=pl_module.device), reduce_op="sum")
        self.tokens_trained += int(tokens)
        # Ending by max_steps mid-epoch skips the epoch-end validation; asking Lightning to stop here
        # makes it validate once more, so final_val_loss describes the final weights.
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Frozen here: the last checkpoint, saved after this hook, must not add its own writing time to the segment.
        self._final_minutes = self._training_minutes(trainer)
        if trainer.ckpt_path and trainer.global_step == self._start_step:
            # Resumed from the last step with nothing left to train, Lightning still ran the loop to its end but
            # logged no loss: the held-out loss is measured now, the training loss is the checkpoint's.
            self._finish_training(trainer, self._final_minutes, val_loss=pl_module.held_out_loss(),
                                  train_loss=self._train_loss)
            return
        self._finish_training(trainer, self._final_minutes)

    def _training_minutes(self, trainer: L.Trainer) -> float:
        """Minutes of this segment so far, less the generation eval's: it runs inside the training loop's hooks."""
        if self._final_minutes is not None or not self._train_started:
            return self._final_minutes or 0.0
        evaluating = _eval_seconds(trainer) - self._eval_s_at_start
        return max(time.perf_counter() - self._train_started - evaluating, 0.0) / 60

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end also runs when a resumed run had nothing left to train (its checkpoint was of the last step,
        # written during the final validation or the export): its figures are measured now, the adapter exported.
        if self._final_minutes is None:
            self._finish_without_steps(trainer, pl_module)
        self._export(trainer, pl_module)

    def _finish_without_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = pl_module.held_out_loss()  # on every rank: each computes its share
        self._final_minutes = 0.0
        if self.manifest is not None:
            self.manifest.start_segment(resumed_from=self._resumed_from(trainer))
            self.manifest.update_segment(start_step=trainer.global_step, end_step=trainer.global_step,
                                         training_minutes=0.0)
            self._finish_training(trainer, 0.0, val_loss=val_loss, train_loss=self._train_loss)

    @rank_zero_only
    def _finish_training(self, trainer: L.Trainer, minutes: float, val_loss: float | None = None,
                         train_loss: float | None = None) -> None:
        metrics = trainer.callback_metrics
        val_loss = _metric(metrics, "val/loss") if val_loss is None else val_loss
        self.manifest.update_segment(end_step=trainer.global_step, training_minutes=round(minutes, 4))
        total_s = 60 * self.manifest.data["training_time_minutes"]  # every segment of a resumed run
        self.manifest.finish_phase("phase_4_training", {"training_stats": {
            "final_train_loss": _metric(metrics, "train/loss") if train_loss is None else train_loss,
            "final_val_loss": val_loss,
            "final_perplexity": math.exp(val_loss) if val_loss is not None else None,
            "optimizer_steps": trainer.global_step,
            "epochs": round(trainer.global_step / max(trainer.num_training_batches, 1), 3),
            "tokens_trained": self.tokens_trained,
            # Steps a float16 GradScaler skipped (inf/nan gradients after unscaling), over every segment.
            "skipped_steps": trainer.lightning_module.skipped_steps,
        }, **_callback_results(trainer)}, wall_s=total_s)
        for callback in trainer.callbacks:
            for phase, results in getattr(callback, "manifest_phases", dict)().items():
                self.manifest.finish_phase(phase, results, wall_s=results.get("eval_seconds"))

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            raise ConfigError(no_step_message(trainer))
        if not trainer.is_global_zero:
            return
        self.manifest.start_phase("phase_6_export")
        pl_module.save_adapter(self.run_dir / ADAPTER_DIR)
        self.manifest.finish_phase("phase_6_export", {"adapter_dir": ADAPTER_DIR})
        if self.manifest.segments:  # none when a resumed run had nothing left to train
            self.manifest.segments[-1].update(status="completed", finished_at=utc_now())
        self.manifest.update(status="completed", finished_at=utc_now())
        # Shown once the progress bar is gone (printing under its live display would garble both).
        for phase in self.manifest.phases:
            if phase not in SHOWN_BEFORE_TRAINING:
                self._show(phase)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        self._trainer = trainer
        if self.manifest is None:  # stopped before setup: while the data module scanned or tokenized
            if not (self.run_dir / MANIFEST_NAME).is_file():
                return
            self.manifest = Manifest(self.run_dir)
        datamodule = trainer.datamodule
        self._record_prepared(datamodule)
        preparing = datamodule.preparing
        if preparing is not None and self.manifest.phases.get(preparing, {}).get("status") != "running":
            self.manifest.start_phase(preparing)
        if isinstance(exception, (TrainingInterrupted, KeyboardInterrupt, DiskFullError)):
            # Not failures: the run resumes from its last checkpoint, which the stop line (or the error) names.
            self._interrupt(trainer, exception)
            return
        self.manifest.fail_running_phases(exception)
        for name, phase in self.manifest.phases.items():
            if phase.get("status") == "failed":
                self._show(name)

    def _interrupt(self, trainer: L.Trainer, exception: BaseException) -> None:
        """A stop, not a failure. The segment keeps the figures of its last checkpoint (brought up to date when
        one was written), which is where a resume starts."""
        reason = (str(exception) if isinstance(exception, (TrainingInterrupted, DiskFullError))
                  else f"KeyboardInterrupt at step {trainer.global_step}: no checkpoint written")
        minutes = self.manifest.data.get("training_time_minutes") or 0.0
        self.manifest.interrupt_running_phases(reason, wall_s={"phase_4_training": 60 * minutes})

    def _show(self, name: str) -> None:
        """One console line for a finished (or failed) phase: status, wall time, key figures."""
        phase = self.manifest.phases.get(name, {})
        mark = {"completed": "[green]✓[/]", "failed": "[red]✗[/]", "interrupted": "[yellow]■[/]"}.get(
            phase.get("status"), "·")
        detail = escape(phase.get("error") or phase.get("interrupted") or phase_summary(name, phase))
        self._console.print(f"[bold]codetune[/] {mark} {name:<18} {phase.get('wall_s') or 0.0:>8.2f} s  {detail}")

    @override
    def state_dict(self) -> dict[str, Any]:
        # The training loss at the checkpoint: a resume with no step left reports it (Lightning keeps no metric).
        train_loss = _metric(self._trainer.callback_metrics, "train/loss") if self._trainer is not None else None
        return {"tokens_trained": self.tokens_trained, "train_loss": train_loss}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_trained = state_dict.get("tokens_trained", 0)
        self._train_loss = state_dict.get("train_loss")


def begin_manifest(run_dir: Path) -> Manifest:
    """The manifest of a run starting (or resuming) in `run_dir`: `running`, without what an earlier process in
    the directory left (its error, its interruption, its end)."""
    manifest = Manifest(run_dir)
    for stale in ("failed_phase", "error", "interrupted_phase", "interrupted", "finished_at", "run_dir"):
        manifest.data.pop(stale, None)
    manifest.update(run_name=run_dir.name, status="running",
                    started_at=manifest.data.get("started_at") or utc_now())
    return manifest


def no_step_message(trainer: L.Trainer) -> str:
    limits = (f"--trainer.max_epochs {trainer.max_epochs}, --trainer.max_steps {trainer.max_steps}, "
              f"--trainer.limit_train_batches {trainer.limit_train_batches}")
    return (f"the run trained no optimizer step ({limits}), so there is no adapter to export: its LoRA weights "
            f"would be the untrained ones. Give it at least one step (e.g. --trainer.max_epochs 1).")


def phase_summary(name: str, phase: dict[str, Any]) -> str:
    """The figures a user looks for first in each phase."""
    if name == "phase_1_scan":
        return f"{phase.get('files_kept')} files, {phase.get('lines')} lines, {sum((phase.get('files_skipped') or {}).values())} skipped"
    if name == "phase_2_tokenize":
        used = phase.get("val_windows_used", phase.get("val_windows"))
        held_out = f" (of {phase.get('val_windows')})" if used != phase.get("val_windows") else ""
        return (f"{phase.get('train_windows')} train / {used}{held_out} val windows of {phase.get('seq_len')} "
                f"tokens, packing {100 * (phase.get('packing_efficiency') or 0):.2f}%")
    if name == "phase_3_model":
        return f"{phase.get('name_or_path')}: {phase.get('trainable_parameters'):,} of {phase.get('total_parameters'):,} parameters trained"
    if name == "phase_4_training":
        stats = phase.get("training_stats") or {}
        return f"{stats.get('optimizer_steps')} steps, train loss {_fmt(stats.get('final_train_loss'))}, val loss {_fmt(stats.get('final_val_loss'))}"
    if name == "phase_5_evaluation":
        base, final = phase.get("base") or {}, phase.get("final") or {}
        return f"held-out perplexity {_fmt(base.get('perplexity'))} (base) -> {_fmt(final.get('perplexity'))}"
    if name == "phase_6_export":
        return f"adapter in {phase.get('adapter_dir')}"
    return ""


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _callback_results(trainer: L.Trainer) -> dict[str, Any]:
    """Results that other callbacks report through a `manifest_results()` method (OOM back-offs, VRAM peaks)."""
    results: dict[str, Any] = {}
    for callback in trainer.callbacks:
        if hasattr(callback, "manifest_results"):
            results.update(callback.manifest_results())
    return results


def _eval_seconds(trainer: L.Trainer) -> float:
    """Seconds the generation eval has spent, over every segment (its history is restored from the checkpoint)."""
    return sum(c.eval_seconds for c in trainer.callbacks if isinstance(c, GenerationEval))


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None
