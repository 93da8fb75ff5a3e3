"""codetune turns on expandable segments for torch's CUDA allocator unless you configured it, and records which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codetune.__main__ import main
from codetune.memory.allocator import (ALLOC_CONF_VARIABLES, DEFAULT_ALLOC_CONF, DEFAULT_MARKER, allocator_record,
                                       expandable_segments, set_allocator_default)

ROOT = Path(__file__).resolve().parents[2]
OURS = {"variable": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True", "expandable_segments": True,
        "chosen_by": "codetune", "note": None}


def test_the_default_is_set_where_no_variable_is():
    environ = {"PATH": "/usr/bin"}
    assert set_allocator_default(environ, platform="linux") is True
    assert environ == {"PATH": "/usr/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", DEFAULT_MARKER: "1"}
    assert allocator_record(environ, platform="linux") == OURS


@pytest.mark.parametrize("variable", ALLOC_CONF_VARIABLES)
@pytest.mark.parametrize("value", ["max_split_size_mb:128", "", DEFAULT_ALLOC_CONF])
def test_a_variable_you_set_is_left_alone_and_recorded_as_yours(variable, value):
    environ = {variable: value}
    assert set_allocator_default(environ, platform="linux") is False
    assert environ == {variable: value}
    assert allocator_record(environ, platform="linux") == {
        "variable": variable, "value": value, "expandable_segments": value == DEFAULT_ALLOC_CONF, "chosen_by": "you",
        "note": None}


def test_the_record_names_the_variable_torch_reads_first():
    environ = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    record = allocator_record(environ, platform="linux")
    assert (record["variable"], record["value"], record["expandable_segments"]) == (
        "PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64", False)


@pytest.mark.parametrize(("value", "on"), [
    ("expandable_segments:True", True),
    ("max_split_size_mb:128, expandable_segments:True", True),
    ("roundup_power2_divisions:[64:8,256:4],expandable_segments:True", True),
    ("expandable_segments:False", False),
    ("expandable_segments:true", False),  # torch accepts only True/False: it rejects this spelling
    ("garbage_collection_threshold:0.6", False),
])
def test_expandable_segments_are_read_from_the_key_value_list(value, on):
    assert expandable_segments(value) is on


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_nothing_is_set_off_linux_and_the_record_says_why(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    environ = {"PATH": "/usr/bin"}
    assert set_allocator_default(environ) is False
    assert environ == {"PATH": "/usr/bin"}
    record = allocator_record(environ)
    assert (record["variable"], record["chosen_by"], record["expandable_segments"]) == (None, None, False)
    assert f"not supported on {platform}" in record["note"]


def test_every_command_starts_with_the_default_set(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    for name in (*ALLOC_CONF_VARIABLES, DEFAULT_MARKER):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
    assert allocator_record() == OURS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="codetune sets the default on Linux only")
def test_the_entry_point_sets_it_before_the_command_or_torch_is_imported():
    # Notes the variable when the dispatched command's module, or torch, is first looked up.
    code = f"""
import json, os, sys
seen = {{}}
class FirstLookup:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "codetune.commands.inspect_repo"):
            seen.setdefault(name, os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        return None
sys.meta_path.insert(0, FirstLookup())
from codetune.__main__ import main
try:
    main(["inspect", "--help"])
except SystemExit:
    pass
print(json.dumps(seen), file=sys.stderr)
"""
    env = {k: v for k, v in os.environ.items() if k not in (*ALLOC_CONF_VARIABLES, DEFAULT_MARKER)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # Set when `inspect` is imported, and torch was not looked up before it.
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"codetune.commands.inspect_repo": DEFAULT_ALLOC_CONF}
