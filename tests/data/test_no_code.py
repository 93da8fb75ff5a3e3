"""A repository whose kept files hold no programming language (only prose and config text: Markdown, plain text,
TOML, JSON, YAML) is refused right after the scan, naming --data.repo, the extensions looked for and what was
found; code with a README next to it trains as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError

from helpers import PY_FILE


def _datamodule(repo: Path, tmp_path: Path, **settings) -> CodeDataModule:
    return CodeDataModule(repo=str(repo), tokenizer="tiny", seq_len=32, batch_size=1, gradient_accumulation_steps=1,
                          fim_rate=0.0, cache_dir=str(tmp_path / "cache"), **settings)


def test_a_readme_only_repository_is_refused_naming_what_was_found(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my project\n")
    (repo / "notes.bin").write_bytes(b"\x00\x01")
    dm = _datamodule(repo, tmp_path)
    with pytest.raises(ConfigError) as raised:
        dm.setup("fit")
    message = str(raised.value)
    assert message.startswith(f"--data.repo {str(repo)!r}: no source code to train on: the scan kept 1 file, "
                              f"README.md (markdown), and none in a programming language.")
    assert "--data.extensions ['.py', '.pyi', '.rs'," in message and "skipped: extension: 1" in message
    assert dm.train_windows is None  # nothing was tokenized


def test_prose_and_config_files_alone_are_not_code(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    for name, text in {"README.md": "# a\n", "docs/guide.txt": "read me\n", "pyproject.toml": "[project]\n",
                       "data.json": "{}\n", "ci.yaml": "on: push\n"}.items():
        (repo / name).write_text(text)
    dm = _datamodule(repo, tmp_path, extensions=[".md", ".txt", ".toml", ".json", ".yaml"])
    with pytest.raises(ConfigError) as raised:
        dm.setup("fit")
    assert ("the scan kept 5 files, README.md (markdown), ci.yaml (yaml), data.json (json), docs/guide.txt (text), "
            "pyproject.toml (toml), and none in a programming language") in str(raised.value)
    assert "none of these is a programming language's" in str(raised.value)


def test_code_with_a_readme_trains(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my project\n")
    (repo / "energy.py").write_text(PY_FILE)
    dm = _datamodule(repo, tmp_path, val_fraction=0.0)
    dm.setup("fit")
    assert dm.split_files["train"] == ["README.md", "energy.py"] and len(dm.train_windows) > 0
