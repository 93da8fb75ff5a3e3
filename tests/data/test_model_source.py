"""--model.name_or_path that names a path but no model is one ConfigError when the module and the data module are
built, before any run directory or file exists; a hub id ('name' or 'namespace/name') is left to the download."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError
import codetune.data.model_source as model_source
from codetune.data.model_source import check_model_source, local_model_dir, model_location, written_as_path
from codetune.model.module import CodeLoRAModule

FLAG = "--model.name_or_path"


@pytest.mark.parametrize(("value", "is_path"), [
    ("Qwen/Qwen2.5-Coder-1.5B", False), ("gpt2", False), ("tiny", False),
    ("./model", True), ("../models/qwen", True), ("/opt/models/qwen", True), ("~/models/qwen", True),
    ("models/qwen/v2", True), ("C:\\models\\qwen", True), (".hidden", True),
])
def test_what_cannot_be_a_hub_id_is_a_path(value, is_path):
    assert written_as_path(value) is is_path


def _build(kind: str, value: str, repo: Path) -> None:
    if kind == "module":
        CodeLoRAModule(name_or_path=value)
    else:  # the CLI links --model.name_or_path into the data module's tokenizer
        CodeDataModule(repo=str(repo), tokenizer=value)


@pytest.mark.parametrize("kind", ["module", "datamodule"])
def test_an_empty_directory_names_the_missing_config(tmp_path, kind):
    empty = tmp_path / "emptymodel"
    empty.mkdir()
    with pytest.raises(ConfigError) as raised:
        _build(kind, str(empty), tmp_path)
    assert str(raised.value).startswith(f"{FLAG} {str(empty)!r}: it has no config.json")
    assert f"Point {FLAG} at a complete model directory" in str(raised.value)


@pytest.mark.parametrize("kind", ["module", "datamodule"])
@pytest.mark.parametrize("value", ["./no/such/dir", "~/no-such-codetune-model", "a/b/c", "models\\qwen"])
def test_a_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path, monkeypatch, kind, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        _build(kind, value, tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{FLAG} {value!r}: no such directory")
    assert "Repo id" not in message and "'namespace/name'" in message


def test_a_file_is_not_a_model_directory(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"is a file, not a model directory"):
        CodeLoRAModule(name_or_path=str(weights))


@pytest.mark.parametrize("value", ["tiny", "Qwen/Qwen2.5-Coder-1.5B", "gpt2"])
def test_hub_ids_and_tiny_are_left_to_loading(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)  # nothing of these names here: each stays a hub id (or the built-in 'tiny')
    assert check_model_source(value, FLAG) is None
    assert CodeLoRAModule(name_or_path=value).hparams.name_or_path == value
    CodeDataModule(repo=str(tmp_path), tokenizer=value)


def test_fit_and_prepare_refuse_an_empty_model_directory_before_writing_anything(tmp_path, capsys):
    from codetune.__main__ import main

    from helpers import TINY_CONFIGS

    empty, repo = tmp_path / "emptymodel", tmp_path / "repo"
    empty.mkdir()
    repo.mkdir()
    (repo / "main.rs").write_text("fn main() {}\n")
    common = [*TINY_CONFIGS, "--data.repo", str(repo), "--model.name_or_path", str(empty),
              "--data.cache_dir", str(tmp_path / "cache")]
    assert main(["fit", *common, "--runs_dir", str(tmp_path / "runs"), "--trainer.max_steps", "1"]) == 2
    assert main(["prepare", *common, "--out", str(tmp_path / "prepared")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("it has no config.json" in line for line in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emptymodel", "repo"]


def test_a_tokenizer_directory_is_enough_for_the_data_module_not_for_the_model(tmp_path):
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.json").write_text("{}")
    CodeDataModule(repo=str(tmp_path), tokenizer=str(tokenizer_only))
    with pytest.raises(ConfigError, match=r"it has no config\.json"):
        CodeLoRAModule(name_or_path=str(tokenizer_only))


@pytest.fixture
def embedded_dir(tmp_path, monkeypatch) -> Path:
    """Where the package keeps the embedded model, pointed at an empty directory of this test's own."""
    directory = tmp_path / "package" / "embedded"
    directory.mkdir(parents=True)
    monkeypatch.setattr(model_source, "EMBEDDED_DIR", directory)
    return directory


def test_embedded_names_the_package_directory_wherever_the_command_runs(tmp_path, monkeypatch, embedded_dir):
    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    build_tiny_model(tokenizer).save_pretrained(embedded_dir)
    tokenizer.save_pretrained(embedded_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded").mkdir()  # a directory of that name here does not shadow the package's model
    assert model_location("embedded") == str(embedded_dir) and local_model_dir("embedded") == embedded_dir
    assert model_location("./embedded") == "./embedded"
    assert check_model_source("embedded", FLAG) is None
    from codetune.commands.plan import model_config_file
    assert model_config_file("embedded") == embedded_dir / "config.json"


def test_an_install_without_the_embedded_model_says_how_to_build_it(embedded_dir):
    with pytest.raises(ConfigError, match=r"--model.name_or_path 'embedded': this install has no embedded model .*"
                                          r"make embedded-model"):
        check_model_source("embedded", FLAG)
