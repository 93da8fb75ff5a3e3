"""User-facing errors: a command prints their message (which names the flag or file and the fix) and
exits with status 2 instead of showing a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A bad flag, config value, path or input repository."""


def exit_status(command: Callable[[], int], program: str = "codetune") -> int:
    """Run `command`; a ConfigError becomes one line on stderr and status 2."""
    try:
        return command()
    except ConfigError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return 2
