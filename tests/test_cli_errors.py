"""A mistyped flag, config key, value, command or --ckpt_path: one short message first, exit status 2, nothing built."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.cli import CodetuneCLI, resolve_config_args, shipped_configs
from codetune.__main__ import main
from codetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "training_config.yaml")
DEMO = str(ROOT / "configs" / "presets" / "demo.yaml")


def fit_error(capsys, tmp_path: Path, *extra: str) -> str:
    """stderr of a `codetune fit` that must fail before anything is built."""
    args = ["fit", "--config", DEFAULT, "--config", DEMO, "--data.repo", str(tmp_path),
            "--runs_dir", str(tmp_path / "runs"), "--run_name", "r", *extra]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "usage:" not in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "runs").exists()
    return captured.err


def test_a_flag_typo_is_one_line_with_the_closest_flag(capsys, tmp_path):
    err = fit_error(capsys, tmp_path, "--data.seqlen", "64", "--trainr.max_steps=3")
    assert err.count("\n") == 1 and err.startswith("codetune fit: error: ")
    assert "--data.seqlen (did you mean --data.seq_len?)" in err
    assert "--trainr.max_steps (did you mean --trainer.max_steps?)" in err


def test_a_wrong_type_names_the_flag_first(capsys, tmp_path):
    err = fit_error(capsys, tmp_path, "--data.seq_len", "abc")
    assert err.startswith("codetune fit: error: --data.seq_len: Expected a <class 'int'>. Got value: abc")
    assert err.count("\n") == 1


def test_every_typo_of_a_yaml_is_listed_at_once_with_the_file(capsys, tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("data:\n  seqlen: 64\n  batch_size: 2\nmodel:\n  lora_rnk: 4\ntrainer:\n  max_step: 3\n"
                   "  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n    init_args:\n      save_dir: logs\n")
    err = fit_error(capsys, tmp_path, "--config", str(bad))
    assert err.count("\n") == 1
    assert f"{bad}: unknown keys data.seqlen (did you mean data.seq_len?), model.lora_rnk (did you mean " \
           f"model.lora_rank?), trainer.max_step (did you mean trainer.max_steps?)." in err
    # A known key whose value is a dict (a class_path and its init_args) is not a typo.
    assert "logger" not in err


@pytest.mark.parametrize("ckpt", ["last", "nowhere/last.ckpt"])
def test_ckpt_path_with_nothing_to_resume_stops_before_training(capsys, tmp_path, ckpt):
    err = fit_error(capsys, tmp_path, "--ckpt_path", ckpt)
    assert err.count("\n") == 1
    if ckpt == "last":
        assert f"--ckpt_path last: {tmp_path / 'runs' / 'r'} does not exist, so there is nothing to resume" in err
        assert "start a new run without --ckpt_path" in err
    else:
        assert f"--ckpt_path {ckpt}: no such checkpoint file" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["test", "predict", "validate"])
def test_lightnings_other_subcommands_are_not_offered(capsys, command):
    assert main([command, "--config", DEFAULT]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"codetune: error: there is no `codetune {command}`") and err.count("\n") == 1
    assert "fit, inspect, plan, prepare, compare, generate, merge" in err
    assert set(CodetuneCLI.subcommands()) == {"fit"}


def test_an_unknown_command_gets_the_closest_one(capsys):
    assert main(["inspcet", "."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codetune: error: invalid command 'inspcet' (did you mean `codetune inspect`?)")


def test_shipped_config_names_resolve_to_the_package_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # far from the checkout's configs/
    names = shipped_configs()
    assert set(names) == {"default", "rust", "demo"}
    args = resolve_config_args(["fit", "--config", "rust", "--config=demo", "-c", "default", "--data.repo", "."])
    assert args == ["fit", "--config", str(names["rust"]), f"--config={names['demo']}", "-c", str(names["default"]),
                    "--data.repo", "."]
    assert names["rust"].read_text() == (ROOT / "configs" / "training_config_rust.yaml").read_text()
    assert names["demo"].read_text() == Path(DEMO).read_text()


def test_a_config_that_is_neither_a_file_nor_a_name_lists_the_names(tmp_path):
    with pytest.raises(ConfigError, match=r"--config rsut: no such file, and not the name of a shipped config "
                                          r"\(default, rust, demo\)"):
        resolve_config_args(["fit", "--config", "rsut"])
    existing = tmp_path / "rust"
    existing.write_text("trainer: {}\n")
    assert resolve_config_args(["--config", str(existing)]) == ["--config", str(existing)]
