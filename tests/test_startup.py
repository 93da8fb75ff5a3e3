"""The commands that need no model start without importing the training stack (torch, Lightning: seconds)."""

from __future__ import annotations


from pathlib import Path

import pytest

from helpers import imported_by

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["test"], ["fti"]])
def test_help_and_unknown_commands_import_no_training_stack(argv):
    assert imported_by(*argv) == []
