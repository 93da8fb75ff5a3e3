"""AtomicCheckpointIO: a save that fails part-way leaves the previous checkpoint whole."""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from codetune.run.checkpoint_io import AtomicCheckpointIO


class Unpicklable:
    """A checkpoint entry that torch.save cannot serialise: the save fails after it started."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this entry")


@contextlib.contextmanager
def disk_full_after(n_bytes: int):
    """Writes past `n_bytes` into any file fail with EFBIG, as a full disk fails them (ENOSPC): the process's file
    size limit, with SIGXFSZ ignored so that the write raises instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def failing_while_serialising(checkpoint_io: AtomicCheckpointIO, path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint_io.save_checkpoint({"global_step": 4, "weights": torch.zeros(4096),
                                       "callbacks": {"Probe": Unpicklable()}}, path)


def failing_while_writing(checkpoint_io: AtomicCheckpointIO, path: Path) -> None:
    # The new checkpoint (~64 KiB) does not fit in what is left, the old one (~4 KiB) would.
    # OSError from Python's writes, RuntimeError from torch's own file writer.
    with disk_full_after(16 * 1024), pytest.raises((OSError, RuntimeError)):
        checkpoint_io.save_checkpoint({"global_step": 4, "weights": torch.zeros(16384)}, path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="emulates a full disk with RLIMIT_FSIZE")
@pytest.mark.parametrize("fail", [failing_while_serialising, failing_while_writing], ids=["serialising", "writing"])
def test_a_failed_save_keeps_the_previous_last_ckpt_whole(tmp_path, fail):
    checkpoint_io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 3, "weights": torch.arange(1024.0)}, last)
    before = last.read_bytes()

    fail(checkpoint_io, last)

    assert last.read_bytes() == before
    restored = checkpoint_io.load_checkpoint(last)
    assert restored["global_step"] == 3 and torch.equal(restored["weights"], torch.arange(1024.0))
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"], "no temporary file is left behind"
    # ...and the next save that succeeds replaces it.
    checkpoint_io.save_checkpoint({"global_step": 5, "weights": torch.ones(8)}, last)
    assert checkpoint_io.load_checkpoint(last)["global_step"] == 5
