"""`codetune --help` lists every command; each command's own help names it in its usage line."""

from __future__ import annotations

import pytest

from codetune.__main__ import COMMANDS, main

LISTED = ["fit", "inspect", "plan", "prepare", "compare", "generate", "merge", "export"]


def test_help_lists_every_command_with_a_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: codetune <command> [options]")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert list(rows) == LISTED == list(COMMANDS)
    assert all(len(text) > 20 for text in rows.values())
    assert not {"validate", "test", "predict"} & set(rows)


def test_no_command_is_the_help_and_status_2(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "fit", "inspect", "compare", "merge", "export"])
def test_each_commands_help_names_it(capsys, command):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: codetune {command} ")
