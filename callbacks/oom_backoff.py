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

from codetune.backoff import INJECT_OOM_ENV, InjectedOOM, accumulation_steps, halved, oom_at_minimum_message
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
    and accumulation). The current micro-batch is in ``state_dict``, so a resumed run starts from it.

    Testing aid: ``CODETUNE_INJECT_OOM=<global_step>[@<rank>]`` makes the first attempt of that
    optimizer step raise ``torch.OutOfMemoryError`` (on the second micro-batch, after one backward),
    on every rank or only on ``rank``, while the micro-batch is above 1; the recovery then runs for
    real, on CPU too.

    Args:
        enabled: Catch out-of-memory errors and back off. When false, an OOM ends the run as usual.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.micro_batch_size: int | None = None
        self.events: list[dict[str, Any]] = []
        self._inject: InjectedOOM | None = None
        self._injected = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        pl_module.backoff = self
        try:
            self._inject = InjectedOOM.parse(os.environ.get(INJECT_OOM_ENV))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = pl_module.micro_batch_size
        else:  # restored from a checkpoint: keep the micro-batch the earlier segment backed off to
            pl_module.micro_batch_size = self.micro_batch_size

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
        new = halved(micro_batch_size)
        if new is None:
            raise OutOfMemoryAtMinimumError(oom_at_minimum_message(step, getattr(trainer.datamodule, "seq_len", None)))
        accumulation = accumulation_steps(optimizer_batch, new)
        self.micro_batch_size = new
        self.events.append({"step": step, "micro_batch_size": new, "gradient_accumulation_steps": accumulation})
        if ran_out:
            # Each rank that ran out says so; the ranks that did not simply follow the vote.
            warnings.warn(rank_prefixed_message(
                f"codetune: out of device memory at step {step} with micro-batch {micro_batch_size}; redoing the "
                f"step as {new} x {accumulation} (effective batch {optimizer_batch} kept).", trainer.global_rank),
                stacklevel=2)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"oom/micro_batch_size": new, "oom/gradient_accumulation_steps": accumulation,
                                        "oom/backoffs": len(self.events)}, step=step)
        return new

    def manifest_results(self) -> dict[str, Any]:
        """What the run's manifest records under phase_4_training."""
        return {"oom_backoffs": list(self.events), "final_micro_batch_size": self.micro_batch_size}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size, "events": list(self.events)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.micro_batch_size = state_dict["micro_batch_size"]
        self.events = list(state_dict["events"])
