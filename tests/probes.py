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


class EmulatedCard(Callback):
    """Gives this rank an emulated card (habit 12: the CPU trains, the memory plan is made for CUDA): its free memory
    is exactly what the plan of micro-batch `micro_batch[rank]`, with `checkpointing[rank]`, needs once the weights
    are loaded. Writes `card_rank<r>.json` into the run directory: the free memory it reported, the micro-batch at
    train start and end, whether activation checkpointing is on, and the module's `vram_plan` record."""

    def __init__(self, micro_batch: list[int], checkpointing: list[bool]) -> None:
        self.micro_batch = micro_batch
        self.checkpointing = checkpointing
        self.report: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:
        plan_memory_for = pl_module._plan_memory  # setup runs before configure_model, which calls it
        rank = trainer.global_rank

        def on_a_card(config, quantize, dtype, device):
            from codetune.memory_plan import GiB, ModelShape, plan_memory

            cuda = torch.device("cuda")
            training = pl_module._training_shape(self.micro_batch[rank], self.checkpointing[rank], quantize, dtype,
                                                 cuda)
            free = plan_memory(ModelShape.from_config(config), training).required_free_bytes(after_load=True)
            self.report["free"] = free
            mem_get_info = torch.cuda.mem_get_info
            torch.cuda.mem_get_info = lambda device=None: (free, 8 * GiB)
            try:
                return plan_memory_for(config, quantize, dtype, cuda)
            finally:
                torch.cuda.mem_get_info = mem_get_info

        pl_module._plan_memory = on_a_card

    def on_train_start(self, trainer, pl_module) -> None:
        self.report["micro_batch_at_start"] = pl_module.micro_batch_size

    def on_train_end(self, trainer, pl_module) -> None:
        self.report.update(micro_batch_at_end=pl_module.micro_batch_size, vram_plan=pl_module.vram_plan,
                           checkpointing=pl_module.causal_lm.is_activation_checkpointing)
        (Path(trainer.default_root_dir) / f"card_rank{trainer.global_rank}.json").write_text(json.dumps(self.report))
