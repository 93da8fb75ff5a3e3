"""Checkpoint files that are always whole: a run killed while saving keeps its previous checkpoint."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from codetune.run import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to it, syncs it to disk and renames it over the
    old one. Lightning's default goes through a temporary file in the system's temp directory and
    *moves* it, which is a copy, not a rename, whenever that directory is on another file system
    (often the case: tmpfs): a SIGKILL or power loss during the copy leaves a truncated ``last.ckpt``,
    the one file a resume needs."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())
