"""What a fit trains on: a repository that must be named, never codetune's own output, and a
warning when nothing is held out for validation."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
from helpers import PY_FILE, RUST_FILE, write_fixture_repo

from codetune.__main__ import main
from codetune.data.datamodule import CodeDataModule
from codetune.data.skip_reasons import SKIP_CODETUNE_OUTPUT
from codetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(ROOT / "configs" / "training_config.yaml"),
           "--config", str(ROOT / "tests" / "tiny.yaml")]
SMALL = ["--model.name_or_path", "tiny", "--data.seq_len", "64", "--data.batch_size", "2",
         "--data.gradient_accumulation_steps", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--generation.max_new_tokens", "4"]


def test_a_missing_repo_is_an_error_that_says_what_to_pass():
    with pytest.raises(ConfigError) as raised:
        CodeDataModule()
    message = str(raised.value)
    assert message.startswith("--data.repo is required") and "make train REPO=" in message
    assert "--data.repo ." in message  # what the demo passes


def test_fit_without_a_repo_exits_2_and_creates_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib.py").write_text(PY_FILE)  # the current directory is not trained on by default
    assert main(["fit", *CONFIGS, *SMALL, "--runs_dir", str(tmp_path / "runs"), "--run_name", "r"]) == 2
    err = capsys.readouterr().err
    assert "--data.repo is required" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_a_prepare_output_and_a_token_cache_in_the_repo_are_never_trained_on(tmp_path):
    repo = write_fixture_repo(tmp_path / "repo")
    sources = CodeDataModule(repo=str(repo), seq_len=64, cache_dir=None)
    sources.setup("fit")
    # An earlier fit whose run directory and token cache are inside the repository (any --runs_dir name) ...
    inside = ["--data.repo", str(repo), "--data.cache_dir", str(repo / "tok-cache")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", *CONFIGS, *SMALL, *inside, "--runs_dir", str(repo / "experiments"), "--run_name", "first",
                     "--trainer.max_steps", "2", "--generation.repo_prompts", "2"]) == 0
        # ... and a prepare output next to it.
        assert main(["prepare", *CONFIGS, *SMALL[:4], *inside, "--out", str(repo / "prepared")]) == 0
    run_dir = repo / "experiments" / "first"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "adapter" / "README.md").is_file()

    again = CodeDataModule(repo=str(repo), seq_len=64, cache_dir=str(repo / "tok-cache"))
    again.setup("fit")
    assert sorted(again.split_files["train"] + again.split_files["val"]) == sorted(
        sources.split_files["train"] + sources.split_files["val"])
    outputs = [s.rel_path for s in again.skipped if s.reason == SKIP_CODETUNE_OUTPUT]
    assert outputs == ["experiments/first/", "prepared/", "tok-cache/tokens/"]
    assert again.report["phase_1_scan"]["files_skipped"][SKIP_CODETUNE_OUTPUT] == 3


def one_file_repo(root: Path) -> Path:
    root.mkdir()
    (root / "main.rs").write_text(RUST_FILE * 3)
    return root


@pytest.mark.parametrize(("make_repo", "val_fraction", "why", "fix"), [
    (one_file_repo, 0.1, "only 1 file was kept", "train on a repository with two files or more"),
    (write_fixture_repo, 0.0, "--data.val_fraction is 0", "set --data.val_fraction above 0"),
])
def test_no_validation_file_is_one_warning_that_says_what_is_missing(tmp_path, make_repo, val_fraction, why, fix):
    module = CodeDataModule(repo=str(make_repo(tmp_path / "repo")), seq_len=64, val_fraction=val_fraction,
                            cache_dir=None)
    with pytest.warns(UserWarning, match="the split left no validation file") as caught:
        module.setup("fit")
    (warning,) = [w for w in caught if "validation file" in str(w.message)]
    message = str(warning.message)
    assert why in message and fix in message
    assert "held-out perplexity" in message and "repo-prompt metrics" in message
    assert module.split_files["val"] == []


def test_a_split_with_a_validation_file_does_not_warn(tmp_path):
    module = CodeDataModule(repo=str(write_fixture_repo(tmp_path / "repo")), seq_len=64, cache_dir=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*validation file")
        module.setup("fit")
    assert len(module.split_files["val"]) >= 1
