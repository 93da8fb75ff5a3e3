"""User-facing errors: a command prints their message (which names the flag or file and the fix) and
exits with status 2 instead of showing a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CodetuneError(Exception):
    """An error whose message tells the user what to change; printed without a traceback."""


class ConfigError(CodetuneError, ValueError):
    """A bad flag, config value, path or input repository, found before anything was trained."""


class OutOfMemoryAtMinimumError(CodetuneError):
    """Training ran out of device memory with a micro-batch of one window: only a config change helps."""


class NonFiniteLossError(CodetuneError):
    """The loss or the gradient norm of an optimizer step was nan or inf: the run stopped before the step,
    so the weights and every checkpoint are the last finite ones."""


class NonFiniteActivationsError(CodetuneError):
    """The base model's held-out loss was nan or inf before any training step: its activations overflow the
    compute dtype (or its weights are damaged)."""


class DiskFullError(CodetuneError, OSError):
    """A file could not be written for lack of space (or quota): nothing half-written is left, and the message
    names the directory, the space the file needed and the space there was."""


class NonFiniteWeightsError(CodetuneError):
    """Trainable weights hold nan or inf: they are not exported as an adapter."""


def exit_status(command: Callable[[], int], program: str = "codetune") -> int:
    """Run `command`; a CodetuneError becomes one line on stderr and status 2."""
    try:
        return command()
    except CodetuneError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return 2
