"""Checkpoint files that are always whole: a run killed while saving keeps its previous checkpoint."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from codetune.storage import atomic_write_bytes

SavedListener = Callable[[Path, int], None]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to it, syncs it to disk and renames it over the
    old one. Lightning's default goes through a temporary file in the system's temp directory and
    *moves* it, which is a copy, not a rename, whenever that directory is on another file system
    (often the case: tmpfs): a SIGKILL or power loss during the copy leaves a truncated ``last.ckpt``,
    the one file a resume needs. A full disk raises ``DiskFullError`` and leaves the old file as it was.

    Callbacks that record where a resume would start (the manifest, the interrupt handler) register in
    ``listeners``: each is called with the file and its global step once that file is whole on disk, never for a
    save that failed (Lightning's ``on_save_checkpoint`` hooks run before the write, so they cannot know)."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[SavedListener] = []

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())
        for listener in self.listeners:
            listener(Path(path), int(checkpoint.get("global_step", 0)))


def listen_to_saves(trainer: Any, listener: SavedListener) -> bool:
    """Register `listener` with the trainer's AtomicCheckpointIO (once); False when the trainer saves through another
    CheckpointIO, whose saves cannot be confirmed."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if not isinstance(checkpoint_io, AtomicCheckpointIO):
        return False
    if listener not in checkpoint_io.listeners:
        checkpoint_io.listeners.append(listener)
    return True
