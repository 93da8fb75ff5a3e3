"""Callbacks that test subprocesses load by class path (`--trainer.callbacks+=...`, PYTHONPATH=tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision


class RankReport(Callback):
    """Writes `rank<r>.json` into the run directory: micro-batch and a digest of the trainable weights."""

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {n: p.detach().double() for n, p in pl_module.named_parameters() if p.requires_grad}
        report = {"micro_batch_size": pl_module.micro_batch_size,
                  "weight_sum": sum(float(w.sum()) for w in weights.values()),
                  "weight_abs_sum": sum(float(w.abs().sum()) for w in weights.values())}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report))


class SampleLog(Callback):
    """Appends `[epoch, step, sample ids]` of every training batch to `samples_rank<r>.jsonl` in the run dir."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / f"samples_rank{trainer.global_rank}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps([trainer.current_epoch, trainer.global_step, batch["sample_ids"].tolist()]) + "\n")


class BlockAtStep(Callback):
    """In a fresh (not resumed) run, stops before optimizer step `step` + 1: writes `blocked` into the run
    directory and sleeps, so that a test can SIGKILL the process at a known point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and trainer.global_step == self.step:
            (Path(trainer.default_root_dir) / "blocked").write_text(str(self.step))
            time.sleep(3600)


class CPUFloat16Precision(MixedPrecision):
    """Lightning's 16-mixed with a real float16 GradScaler, on the CPU (where Lightning itself would train
    16-mixed as bf16-mixed), so the GradScaler path of the step runs in tests: `--trainer.plugins
    probes.CPUFloat16Precision`."""

    def __init__(self, init_scale: float = 2.0**16) -> None:
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


class StepLog(Callback):
    """Appends `{step, grad_norm, loss, skipped}` of every optimizer step to `steps.jsonl` in the run dir."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "grad_norm": float(metrics["train/grad_norm"]),
               "loss": float(metrics["train/loss"]), "skipped": pl_module.skipped_steps}
        with (Path(trainer.default_root_dir) / f"steps_rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class SlowRankZeroEval(Callback):
    """Makes every generation eval on rank zero take `seconds` longer (a big eval on a slow card), so that a test
    can check the other ranks are not left waiting in a collective of the training process group meanwhile."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage) -> None:
        from callbacks.generation_eval import GenerationEval

        if not trainer.is_global_zero:
            return
        evaluation = next(c for c in trainer.callbacks if isinstance(c, GenerationEval))
        generate = evaluation._generate

        def slow_generate(module, *args, **kwargs):
            time.sleep(self.seconds)
            return generate(module, *args, **kwargs)

        evaluation._generate = slow_generate
