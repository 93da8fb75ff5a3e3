"""Out-of-memory recovery: redo the failed optimizer step at half the micro-batch, losing nothing."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.fabric.utilities.rank_zero import rank_prefixed_message
from typing_extensions import override

from codetune.callbacks.vram_monitor import VRAMMonitor
from codetune.errors import ConfigError
from codetune.memory.backoff import INJECT_OOM_ENV, BackOff, InjectedOOM
from codetune.model.step import StepNumerics


class OOMBackoff(Callback):
    """Survives CUDA out-of-memory errors without changing what is learned.

    Each training batch is a whole optimizer batch (micro-batch x gradient accumulation windows, from
    the data module); the module's step (``codetune.model.step.StepNumerics``, the one owner of the
    micro-batch) cuts it into micro-batches. This callback turns the step's OOM retry on and keeps
    its records: when forward or backward runs out of memory on any rank, every rank drops that
    attempt's partial gradients, frees the memory, and runs the *same* windows again with the
    micro-batch halved and the accumulation doubled, so the effective batch, the samples, the loss
    normalisation and the gradient stay those of the failed attempt (up to float summation order).
    The optimizer and the learning-rate schedule step only once the batch succeeded, so a failed
    attempt does not advance them. A back-off is permanent for the run. At micro-batch 1 a further
    OOM stops the run with a message listing what to change (``OutOfMemoryAtMinimumError``); the
    last checkpoint is kept.

    Agreement across ranks: the step votes through the strategy after each attempt
    (``reduce_boolean_decision``), so an OOM on one rank makes all ranks back off together, and no
    rank waits in a collective that another rank will never reach.

    Records: each back-off is logged to TensorBoard (``oom/micro_batch_size``,
    ``oom/gradient_accumulation_steps``, ``oom/backoffs``), warned on the console by each rank that
    ran out, and listed in the manifest (``phase_4_training.oom_backoffs``: step, new micro-batch
    and accumulation, and ``reason``: ``oom`` or ``proactive``). The back-offs are in ``state_dict``: a
    resumed run starts from the last one's micro-batch (or from a smaller ``--data.batch_size`` given at
    the resume); a run without any keeps its own. The step checkpoints that micro-batch as well; a
    checkpoint that holds it only here resumes at it just the same.

    Testing aid: ``CODETUNE_INJECT_OOM=<global_step>[@<rank>]`` makes the first attempt of that
    optimizer step raise ``torch.OutOfMemoryError`` (on the second micro-batch, after one backward),
    on every rank or only on ``rank``, while the micro-batch is above 1; the recovery then runs for
    real, on CPU too.

    Pro-active mode (``proactive_fraction``): before each optimizer step, when the card's used memory
    (NVML, read through the VRAM monitor, ``--vram.*``) is above that fraction on any rank, back off
    once before trying (the step halves its micro-batch), and release torch's cached blocks so the
    next reading shows the new size.
    NVML counts everything on the card, so set it near the top (0.95): a back-off is permanent.
    Whether the ranks vote follows from the config alone, so all of them vote every step (one
    collective each); a rank whose monitor is off (no NVML there) votes "not full" and says so once.

    Args:
        enabled: Catch out-of-memory errors and back off. When false, an OOM ends the run as usual.
        proactive_fraction: Back off before a step when the card is fuller than this fraction
            (0 < f < 1); null waits for an actual OOM. Needs the VRAM monitor (a CUDA device and NVML).
    """

    def __init__(self, enabled: bool = True, proactive_fraction: float | None = None) -> None:
        if proactive_fraction is not None and not 0.0 < proactive_fraction < 1.0:
            raise ConfigError(f"--oom_backoff.proactive_fraction={proactive_fraction}: use a fraction of the card "
                              f"between 0 and 1, e.g. 0.95, or null to back off only on an actual OOM.")
        self.enabled = enabled
        self.proactive_fraction = proactive_fraction
        self._monitor: VRAMMonitor | None = None
        self._numerics: StepNumerics | None = None
        self.events: list[dict[str, Any]] = []

    @property
    def _proactive(self) -> bool:
        """Whether each optimizer step starts with the vote: from the config alone, so the same on every rank."""
        return self.enabled and self.proactive_fraction is not None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        try:
            inject = InjectedOOM.parse(os.environ.get(INJECT_OOM_ENV))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._numerics = pl_module.numerics
        self._numerics.retry_out_of_memory(self._after_oom, inject)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.events:  # restored from a checkpoint: keep the micro-batch an earlier segment backed off to
            pl_module.numerics.cap(self.events[-1]["micro_batch_size"])
        if self._proactive:
            self._monitor = next((c for c in trainer.callbacks if isinstance(c, VRAMMonitor) and c.enabled), None)
            if self._monitor is None:
                # Said by each rank concerned: under DDP one machine may lack NVML while the others have it.
                warnings.warn(rank_prefixed_message(
                    "codetune: --oom_backoff.proactive_fraction is set but the VRAM monitor is off here (no CUDA "
                    "device or NVML, see its warning), so this rank votes 'not full' and its back-offs wait for an "
                    "actual OOM.", trainer.global_rank), stacklevel=2)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._proactive:
            return
        fraction = self._monitor.used_fraction() if self._monitor is not None else None
        full = fraction is not None and fraction > self.proactive_fraction
        # Every rank votes every step (the same collective on all of them), and all follow the fullest card.
        if not trainer.strategy.reduce_boolean_decision(full, all=False):
            return
        back_off = pl_module.numerics.back_off(trainer.global_step, batch["input_ids"].shape[0], "proactive")
        if back_off is not None:  # None at micro-batch 1: nothing left to halve
            self._record(trainer, back_off)
            torch.cuda.empty_cache()

    def _after_oom(self, trainer: L.Trainer, back_off: BackOff, ran_out: bool) -> None:
        """What the step tells of each back-off after an OOM; `ran_out`: this rank is one that ran out."""
        self._record(trainer, back_off)
        if ran_out:
            # Each rank that ran out says so; the ranks that did not simply follow the vote.
            warnings.warn(rank_prefixed_message(
                f"codetune: out of device memory at step {back_off.step} with micro-batch "
                f"{back_off.previous_micro_batch_size}; redoing the step as {back_off.micro_batch_size} x "
                f"{back_off.gradient_accumulation_steps} (effective batch {back_off.optimizer_batch} kept).",
                trainer.global_rank), stacklevel=2)

    def _record(self, trainer: L.Trainer, back_off: BackOff) -> None:
        """Keep the back-off for the manifest and the checkpoint, and log it."""
        self.events.append(back_off.record())
        for logger in trainer.loggers:
            logger.log_metrics({"oom/micro_batch_size": back_off.micro_batch_size,
                                "oom/gradient_accumulation_steps": back_off.gradient_accumulation_steps,
                                "oom/backoffs": len(self.events)}, step=trainer.global_step)

    def manifest_results(self) -> dict[str, Any]:
        """What the run's manifest records under phase_4_training."""
        final = self._numerics.micro_batch_size if self._numerics is not None else None
        return {"oom_backoffs": list(self.events), "final_micro_batch_size": final}

    @override
    def state_dict(self) -> dict[str, Any]:
        # The back-offs alone: the current micro-batch is the last one's (a run without any keeps its own).
        return {"events": list(self.events)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
