"""What an export records of the files it wrote: each one's path, size and sha256."""

from __future__ import annotations

import hashlib

from codetune.export.record import file_records


def test_file_records_lists_every_file_with_its_size_and_sha256(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.gguf").write_bytes(b"\x00" * (3 << 20))  # more than one read of 1 MiB
    (tmp_path / "sub" / "a.json").write_text("{}")
    assert file_records(tmp_path) == [
        {"file": "b.gguf", "bytes": 3 << 20, "sha256": hashlib.sha256(b"\x00" * (3 << 20)).hexdigest()},
        {"file": "sub/a.json", "bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
    ]
