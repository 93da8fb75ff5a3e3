"""The commands that need no model start without importing the training stack (torch, Lightning: seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers", "peft", "bitsandbytes")


def imported_by(*argv: str) -> list[str]:
    """The heavy modules `codetune ARGV` imported, in a fresh interpreter (SystemExit from --help is fine)."""
    code = ("import json, sys\nfrom codetune.__main__ import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)")
    # This checkout's code, even where the editable install points at another one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                            timeout=120, cwd=ROOT)
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["test"], ["fti"]])
def test_help_and_unknown_commands_import_no_training_stack(argv):
    assert imported_by(*argv) == []
