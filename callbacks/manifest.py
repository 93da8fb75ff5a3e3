"""Run manifest and adapter export."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from codetune.run import Manifest, git_commit, package_versions, utc_now

ADAPTER_DIR = "adapter"


class ManifestWriter(Callback):
    """Writes the run's MANIFEST.json through every phase and exports the LoRA adapter at the end.

    The run directory is the trainer's ``default_root_dir`` (the CLI sets it to ``runs/<run_name>``).
    Rank zero alone writes. Phases recorded under ``phase_results``:

    - ``phase_1_scan`` / ``phase_2_tokenize``: the data module's report (files kept and skipped by
      reason, secrets redacted, tokens and windows per split, packing efficiency, wall times);
    - ``phase_3_model``: base model, quantization, dtype, gradient checkpointing, fully trained layers,
      trainable and total parameters;
    - ``phase_4_training``: ``training_stats`` with ``final_train_loss``, ``final_val_loss``,
      ``final_perplexity``, optimizer steps, epochs, tokens trained; plus what any other callback
      returns from a ``manifest_results()`` method (``oom_backoffs``, ``peak_vram_gb``...);
    - ``phase_5_evaluation`` and any other phase a callback returns from ``manifest_phases()``
      (the generation eval: base and tuned metrics, deltas);
    - ``phase_6_export``: the adapter directory (peft ``save_pretrained``, safetensors).

    Top level: ``run_name``, ``run_dir``, ``status``, ``training_time_minutes``, ``started_at``,
    ``finished_at``, ``repo``, ``repo_git_commit``, ``versions``, ``config`` (the resolved CLI
    config, when the CLI saved one). A failure marks the running phase ``failed`` with the error.

    Example::

        jq .phase_results.phase_4_training.training_stats.final_train_loss runs/demo/MANIFEST.json
    """

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.tokens_trained = 0
        self._train_started = 0.0

    @property
    def run_dir(self) -> Path:
        return Path(self._trainer.default_root_dir)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit" or not trainer.is_global_zero:
            return
        self.manifest = Manifest(self.run_dir)
        datamodule = trainer.datamodule
        repo = Path(getattr(datamodule, "repo", ".")).resolve()
        self.manifest.update(run_name=self.run_dir.name, run_dir=str(self.run_dir.resolve()), status="running",
                             started_at=utc_now(), repo=str(repo), repo_git_commit=git_commit(repo),
                             versions=package_versions())
        for phase, results in getattr(datamodule, "report", {}).items():
            self.manifest.finish_phase(phase, {k: v for k, v in results.items() if k != "wall_s"},
                                       wall_s=results.get("wall_s", 0.0))

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
            "architecture": type(base).__name__,
            "quantized_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
            "dtype": str(base.dtype).replace("torch.", ""),
            "gradient_checkpointing": bool(base.is_activation_checkpointing),
            "modules_to_save": list(pl_module.hparams.modules_to_save),
            "optimizer": pl_module.optimizer_name,
            "vram_plan": pl_module.vram_plan,
            "trainable_parameters": trainable,
            "total_parameters": total,
        }, wall_s=0.0)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started = time.perf_counter()
        if self.manifest is not None:
            self.manifest.start_phase("phase_4_training")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.tokens_trained += int(batch["input_ids"].numel())
        # Ending by max_steps mid-epoch skips the epoch-end validation; asking Lightning to stop here
        # makes it validate once more, so final_val_loss describes the final weights.
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._train_started) / 60
        self._finish_training(trainer, minutes)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end also runs when a resumed run had nothing left to train: the adapter is still exported.
        self._export(trainer, pl_module)

    @rank_zero_only
    def _finish_training(self, trainer: L.Trainer, minutes: float) -> None:
        metrics = trainer.callback_metrics
        val_loss = _metric(metrics, "val/loss")
        self.manifest.finish_phase("phase_4_training", {"training_stats": {
            "final_train_loss": _metric(metrics, "train/loss"),
            "final_val_loss": val_loss,
            "final_perplexity": math.exp(val_loss) if val_loss is not None else None,
            "optimizer_steps": trainer.global_step,
            "epochs": round(trainer.global_step / max(trainer.num_training_batches, 1), 3),
            "tokens_trained": self.tokens_trained,
        }, **_callback_results(trainer)})
        self.manifest.update(training_time_minutes=round(minutes, 4))
        for callback in trainer.callbacks:
            for phase, results in getattr(callback, "manifest_phases", dict)().items():
                self.manifest.finish_phase(phase, results, wall_s=results.get("eval_seconds"))

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.manifest.start_phase("phase_6_export")
        adapter = self.run_dir / ADAPTER_DIR
        pl_module.save_adapter(adapter)
        self.manifest.finish_phase("phase_6_export", {"adapter_dir": str(adapter.resolve())})
        self.manifest.update(status="completed", finished_at=utc_now())

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.manifest is not None:
            self.manifest.fail_running_phases(exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tokens_trained": self.tokens_trained}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_trained = state_dict.get("tokens_trained", 0)


def _callback_results(trainer: L.Trainer) -> dict[str, Any]:
    """Results that other callbacks report through a `manifest_results()` method (OOM back-offs, VRAM peaks)."""
    results: dict[str, Any] = {}
    for callback in trainer.callbacks:
        if hasattr(callback, "manifest_results"):
            results.update(callback.manifest_results())
    return results


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None
