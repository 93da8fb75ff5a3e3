"""`--out` of prepare, merge and export: an earlier output is replaced only when it holds nothing but what the
command wrote there (its marker's `output_files`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codetune.errors import ConfigError
from codetune.storage import replaceable_output_dir, write_output_marker

MARKER = "codetune_export.json"


def earlier_output(out: Path) -> Path:
    """An output as a command leaves it: two files, one in a folder, and the marker listing them."""
    (out / "weights").mkdir(parents=True)
    (out / "adapter.gguf").write_bytes(b"GGUF")
    (out / "weights" / "model.safetensors").write_bytes(b"st")
    write_output_marker(out, MARKER, {"format": "gguf"})
    return out


def test_the_marker_lists_every_file_written_and_itself(tmp_path):
    out = earlier_output(tmp_path / "out")
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"format": "gguf", "output_files": ["adapter.gguf", MARKER, "weights/model.safetensors"]}
    assert replaceable_output_dir(str(out), MARKER, "codetune export") == out


def test_anything_the_command_did_not_write_is_named_and_counted(tmp_path):
    out = earlier_output(tmp_path / "out")
    for name in ("a.txt", "b.txt", "c.txt", "weights/notes.md"):
        (out / name).write_text("mine")
    (out / "empty").mkdir()
    (out / "linked").symlink_to(tmp_path)
    with pytest.raises(ConfigError) as raised:
        replaceable_output_dir(str(out), MARKER, "codetune export")
    assert str(raised.value) == (
        f"--out {str(out)!r} holds 6 files or folders that no earlier `codetune export` wrote there: a.txt, b.txt, "
        f"c.txt, empty/ and 2 more; replacing the directory would delete them. Move them out of {out}, or give "
        f"another --out.")


def test_a_marker_without_the_list_makes_every_other_file_foreign(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter.gguf").write_bytes(b"GGUF")
    (out / MARKER).write_text('{"format": "gguf"}')
    with pytest.raises(ConfigError, match=r"holds 1 file or folder that no earlier `codetune export` wrote there: "
                                          r"adapter.gguf \(its codetune_export.json lists no files"):
        replaceable_output_dir(str(out), MARKER, "codetune export")
    (out / MARKER).write_text("not json")
    with pytest.raises(ConfigError, match=r"adapter.gguf \(its codetune_export.json lists no files"):
        replaceable_output_dir(str(out), MARKER, "codetune export")
    (out / "adapter.gguf").unlink()
    assert replaceable_output_dir(str(out), MARKER, "codetune export") == out


def test_new_empty_and_refused_directories(tmp_path):
    assert replaceable_output_dir(str(tmp_path / "new"), MARKER, "codetune export") == tmp_path / "new"
    assert replaceable_output_dir(str(tmp_path), MARKER, "codetune export") == tmp_path
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a non-empty directory that is not an earlier `codetune export` output"):
        replaceable_output_dir(str(tmp_path), MARKER, "codetune export")
    with pytest.raises(ConfigError, match="is a file"):
        replaceable_output_dir(str(tmp_path / "notes.txt"), MARKER, "codetune export")
