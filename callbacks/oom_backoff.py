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

from codetune.memory.backoff import INJECT_OOM_ENV, InjectedOOM, accumulation_steps, halved, oom_at_minimum_message
from codetune.callbacks.vram_monitor import VRAMMonitor
from codetune.errors import ConfigError, OutOfMemoryAtMinimumError


class OOMBackoff(Callback):
    """Survives CUDA out-of-memory errors without changing what is learned.

    Each training batch is a whole optimizer batch (micro-batch x gradient accumulation windows, from
    the data module); the module cuts it into micro-batches. When forward or backward runs out of
    memory on any rank, every rank drops that attempt's partial gradients, frees the memory, and runs
    the *same* windows again with the micro-batch halved and the accumulation doubled, so the
    effective batch, the samples, the loss normalisation and the gradient stay those of the failed
    attempt (up to float summation order). The optimizer and the learning-rate schedule step only
    once the batch succeeded, so a failed attempt does not advance them. A back-off is permanent for
    the run. At micro-batch 1 a further OOM stops the run with a message listing what to change
    (``OutOfMemoryAtMinimumError``); the last checkpoint is kept.

    Agreement across ranks: the module votes through the strategy after each attempt
    (``reduce_boolean_decision``), so an OOM on one rank makes all ranks back off together, and no
    rank waits in a collective that another rank will never reach.

    Records: each back-off is logged to TensorBoard (``oom/micro_batch_size``,
    ``oom/gradient_accumulation_steps``, ``oom/backoffs``), warned on the console by each rank that
    ran out, and listed in the manifest (``phase_4_training.oom_backoffs``: step, new micro-batch
    and accumulation, and ``reason``: ``oom`` or ``proactive``). The back-offs are in ``state_dict``: a resumed run starts from the last one's micro-batch
    (or from a smaller ``--data.batch_size`` given at the resume); a run without any keeps its own.

    Testing aid: ``CODETUNE_INJECT_OOM=<global_step>[@<rank>]`` makes the first attempt of that
    optimizer step raise ``torch.OutOfMemoryError`` (on the second micro-batch, after one backward),
    on every rank or only on ``rank``, while the micro-batch is above 1; the recovery then runs for
    real, on CPU too.

    Pro-active mode (``proactive_fraction``): before each optimizer step, when the card's used memory
    (NVML, read through the VRAM monitor, ``--vram.*``) is above that fraction on any rank, back off
    once before trying, and release torch's cached blocks so the next reading shows the new size.
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
        self._module: L.LightningModule | None = None
        self.events: list[dict[str, Any]] = []
        self._inject: InjectedOOM | None = None
        self._injected = False

    @property
    def _proactive(self) -> bool:
        """Whether each optimizer step starts with the vote: from the config alone, so the same on every rank."""
        return self.enabled and self.proactive_fraction is not None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        pl_module.backoff = self
        self._module = pl_module
        try:
            self._inject = InjectedOOM.parse(os.environ.get(INJECT_OOM_ENV))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.events:  # restored from a checkpoint: keep the micro-batch an earlier segment backed off to
            pl_module.micro_batch_size = min(pl_module.micro_batch_size, self.events[-1]["micro_batch_size"])
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
        if trainer.strategy.reduce_boolean_decision(full, all=False) and halved(pl_module.micro_batch_size):
            event = self._back_off(trainer, pl_module.micro_batch_size, batch["input_ids"].shape[0], "proactive")
            pl_module.micro_batch_size = event["micro_batch_size"]
            torch.cuda.empty_cache()

    def maybe_inject_oom(self, trainer: L.Trainer, micro_batch_size: int, at_this_micro_batch: bool) -> None:
        """Raise the injected OOM if `CODETUNE_INJECT_OOM` names this step (first attempt only)."""
        if (self._inject is None or self._injected or not at_this_micro_batch
                or not self._inject.fires(trainer.global_step, trainer.global_rank, micro_batch_size)):
            return
        self._injected = True
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV} at step "
                                     f"{trainer.global_step} on rank {trainer.global_rank})")

    def after_oom(self, trainer: L.Trainer, micro_batch_size: int, optimizer_batch: int, ran_out: bool) -> int:
        """The micro-batch to retry the step with; records the back-off. Raises at micro-batch 1."""
        step = trainer.global_step
        if halved(micro_batch_size) is None:
            raise OutOfMemoryAtMinimumError(oom_at_minimum_message(step, getattr(trainer.datamodule, "seq_len", None)))
        event = self._back_off(trainer, micro_batch_size, optimizer_batch, "oom")
        if ran_out:
            # Each rank that ran out says so; the ranks that did not simply follow the vote.
            warnings.warn(rank_prefixed_message(
                f"codetune: out of device memory at step {step} with micro-batch {micro_batch_size}; redoing the "
                f"step as {event['micro_batch_size']} x {event['gradient_accumulation_steps']} (effective batch "
                f"{optimizer_batch} kept).", trainer.global_rank), stacklevel=2)
        return event["micro_batch_size"]

    def _back_off(self, trainer: L.Trainer, micro_batch_size: int, optimizer_batch: int,
                  reason: str) -> dict[str, Any]:
        """Halve the micro-batch, record and log it (`reason`: "oom" or "proactive"); returns the event."""
        new = halved(micro_batch_size)
        accumulation = accumulation_steps(optimizer_batch, new)
        event = {"step": trainer.global_step, "micro_batch_size": new, "gradient_accumulation_steps": accumulation,
                 "reason": reason}
        self.events.append(event)
        for logger in trainer.loggers:
            logger.log_metrics({"oom/micro_batch_size": new, "oom/gradient_accumulation_steps": accumulation,
                                "oom/backoffs": len(self.events)}, step=trainer.global_step)
        return event

    def manifest_results(self) -> dict[str, Any]:
        """What the run's manifest records under phase_4_training."""
        final = self._module.micro_batch_size if self._module is not None else None
        return {"oom_backoffs": list(self.events), "final_micro_batch_size": final}

    @override
    def state_dict(self) -> dict[str, Any]:
        # The back-offs alone: the current micro-batch is the last one's (a run without any keeps its own).
        return {"events": list(self.events)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
