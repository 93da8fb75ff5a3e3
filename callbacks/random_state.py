"""Random generators in the checkpoint, so a resumed run draws what the uninterrupted run would have."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import random

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


class RandomState(Callback):
    """Saves every rank's random generators (torch CPU and CUDA, numpy, Python) in each checkpoint and
    restores them right before the first training batch of a resumed run.

    Lightning's checkpoints hold weights, optimizer, schedulers, loop counters and callback state, but
    not the generators: after a resume, LoRA dropout would draw new masks and the run would drift from
    the one that was interrupted. With this callback, the data position from the data module's
    ``state_dict`` and a deterministic base model, a run killed at any step and resumed from its last
    checkpoint ends with the same adapter as an uninterrupted one (float tolerance; a test checks it).

    The generators are captured when the checkpoint is written (after an optimizer step, or after the
    epoch's validation) and restored at ``on_train_batch_start``, the first point where the
    uninterrupted run draws again: validation does not draw (dropout is off in eval mode), the
    generation eval runs under a forked generator, and the data loaders have their own generator.

    Under DDP every rank's state is gathered into the checkpoint (rank zero writes it) and each rank
    gets its own back. Resumed with a different number of ranks, the generators are left as seeded,
    with a warning.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            # Every rank writes a checkpoint's contents (rank zero alone saves them), so all reach this.
            torch.distributed.all_gather_object(ranks, state)
            return {"ranks": ranks}
        return {"ranks": [state]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending.get("ranks", []), None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(f"codetune: the checkpoint holds the random generators of {len(ranks)} process(es), "
                           f"this run has {trainer.world_size}; they stay as seeded, so dropout masks differ "
                           "from the interrupted run's.")
            return
        set_rng_states(ranks[trainer.global_rank])


def rng_states() -> dict[str, Any]:
    """The global generators as tensors, ints and tuples only: checkpoints load with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate()}


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["torch.cuda"] and torch.cuda.is_available():  # not when saved on a GPU and resumed without one
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
