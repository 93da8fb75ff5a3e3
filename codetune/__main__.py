"""`codetune` / `python -m codetune`: dispatch to a command.

`inspect` and `compare` are answered without importing Lightning, peft or bitsandbytes (seconds of
import time); `plan` goes straight to `codetune.plan` (which needs Lightning's parser and the real classes'
defaults); everything else goes to the Lightning CLI in `codetune.cli` (`fit`, `validate`, `prepare`, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        from codetune.inspect import run

        return run(argv[1:])
    if argv[:1] == ["compare"]:
        from codetune.compare import run as compare

        return compare(argv[1:])
    if argv[:1] == ["plan"]:
        # Straight to the command (it reads the real classes' defaults, so it imports Lightning itself).
        from codetune.plan import main as plan

        return plan(argv[1:])
    from codetune.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
