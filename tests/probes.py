"""Callbacks that test subprocesses load by class path (`--trainer.callbacks+=...`, PYTHONPATH=tests)."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
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
        from codetune.callbacks.generation_eval import GenerationEval

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
            from codetune.memory.estimate import plan_memory
            from codetune.memory.shapes import ModelShape
            from codetune.memory.units import GiB

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


class RankSeededDraws(Callback):
    """Seeds each rank's torch, numpy and Python generators differently at the start of a fresh run (Lightning seeds
    every rank alike, so their streams would coincide and any rank's state would do for all), and after every
    optimizer step appends `[step, draws]` to `draws_rank<r>.jsonl` in the run directory. Loaded by class path
    (PYTHONPATH=tests)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None:  # a resumed run's generators are the checkpoint's
            seed = 1000 + trainer.global_rank
            torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        draws = [*torch.rand(2).tolist(), float(np.random.rand()), random.random()]
        with (Path(trainer.default_root_dir) / f"draws_rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps([trainer.global_step, draws]) + "\n")


class KeepCheckpoint(Callback):
    """In a fresh run, copies checkpoints/last.ckpt to `step<step>.ckpt` in the run directory before optimizer step
    `step` + 1, so that a test can resume from that point of a run that went on to its end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and trainer.is_global_zero and trainer.global_step == self.step:
            run_dir = Path(trainer.default_root_dir)
            shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", run_dir / f"step{self.step}.ckpt")


class WaitForFile(Callback):
    """Waits at the start of training until `go` exists in the run directory (writing `waiting` there first)."""

    def on_train_start(self, trainer, pl_module) -> None:
        run_dir = Path(trainer.default_root_dir)
        (run_dir / "waiting").write_text("")
        deadline = time.monotonic() + 300
        while not (run_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class FillDiskAfter(Callback):
    """At the end of optimizer step `step` (before that step's checkpoint is written), fills the run directory's
    file system but for `leave` bytes, when it is a small one (at most 256 MiB)."""

    def __init__(self, step: int, leave: int) -> None:
        self.step, self.leave = step, leave

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        usage = shutil.disk_usage(trainer.default_root_dir)
        # Only on the test's small tmpfs: the run resumed elsewhere keeps this callback in its config.
        if trainer.global_step == self.step and usage.total <= 2**28:
            free = usage.free
            with open(Path(trainer.default_root_dir).parent / "filler", "wb") as f:
                f.write(b"\0" * max(free - self.leave, 0))


class BatchLog(Callback):
    """Writes the training files in window order (`train_files.json`), then appends every training batch the model
    trained on, with the DataLoader's worker count, to `batches.jsonl` in the run directory."""

    def on_train_start(self, trainer, pl_module) -> None:
        (Path(trainer.default_root_dir) / "train_files.json").write_text(
            json.dumps(trainer.datamodule.split_files["train"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step, "num_workers": trainer.train_dataloader.num_workers,
               **{k: v.tolist() for k, v in batch.items()}}
        with (Path(trainer.default_root_dir) / "batches.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


class PauseUntilSignalled(Callback):
    """In a fresh run, waits before optimizer step `step` + 1 (writing `paused` into the run directory) until the
    test wrote `signalled` there, right after signalling the process: the signal lands at a known point, and the
    interrupt's checkpoint is that of step `step` + 1. Loaded by class path from this module (PYTHONPATH=tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is not None or trainer.global_step != self.step:
            return
        run_dir = Path(trainer.default_root_dir)
        (run_dir / "paused").write_text(str(self.step))
        deadline = time.monotonic() + 120
        # A signal's Python handler runs as soon as the sleep it interrupts returns, before the file is checked.
        while not (run_dir / "signalled").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class VocabularyLog(Callback):
    """Writes the vocabulary the data was tokenized with (and the model trains on) into the run directory, as
    `vocabulary_fresh.json` or `vocabulary_resumed.json`. Loaded by class path (tests/ is on sys.path)."""

    def on_train_start(self, trainer, pl_module) -> None:
        assert pl_module.tokenizer is trainer.datamodule.tokenizer
        kind = "resumed" if trainer.ckpt_path else "fresh"
        (Path(trainer.default_root_dir) / f"vocabulary_{kind}.json").write_text(
            json.dumps(trainer.datamodule.tokenizer.get_vocab()))
