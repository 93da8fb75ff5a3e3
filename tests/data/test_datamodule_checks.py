"""`CodeDataModule.__init__` checks every setting before anything is read: each bad value is one ConfigError that
names its flag and the value (the repository exists in each case, so only the check under test can refuse it)."""

from __future__ import annotations

import math

import pytest

from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError


@pytest.mark.parametrize(("setting", "message"), [
    ({"batch_size": "auto"}, "--data.batch_size auto needs --data.effective_batch_size N"),
    ({"batch_size": "auto", "effective_batch_size": 0}, "--data.batch_size auto needs --data.effective_batch_size N"),
    ({"batch_size": 0}, "--data.batch_size=0: must be a positive integer or 'auto'"),
    ({"batch_size": 2.5}, "--data.batch_size=2.5: must be a positive integer or 'auto'"),
    ({"gradient_accumulation_steps": 0}, "--data.gradient_accumulation_steps=0: must be a positive integer"),
    ({"seq_len": 0}, "--data.seq_len=0: must be a positive integer"),
    ({"seq_len": 1}, "--data.seq_len=1: a window needs at least 2 tokens"),
    ({"ignore_patterns": "*.lock"}, "--data.ignore_patterns must be a list of patterns, got the string '*.lock'"),
    ({"extensions": ".rs"}, "--data.extensions must be a non-empty list"),
    ({"extensions": []}, "--data.extensions must be a non-empty list"),
    ({"extensions": ["rs", ".nope"]}, "--data.extensions ['rs', '.nope'] are not supported"),
    ({"max_file_bytes": 0}, "--data.max_file_bytes must be positive, got 0"),
    ({"max_line_length": 0}, "--data.max_line_length must be positive, got 0"),
    ({"val_fraction": 1.0}, "--data.val_fraction=1.0: use a value in [0, 1)"),
    ({"val_fraction": -0.1}, "--data.val_fraction=-0.1: use a value in [0, 1)"),
    ({"val_fraction": math.nan}, "--data.val_fraction=nan: use a value in [0, 1)"),
    ({"packing": "padded"}, "--data.packing='padded': use 'isolated' or 'concat'"),
    ({"fim_rate": 1.5}, "--data.fim_rate=1.5: use a share in [0, 1]"),
    ({"fim_spm_rate": -0.5}, "--data.fim_spm_rate=-0.5: use a share in [0, 1]"),
    ({"fim_line_rate": 1.2}, "--data.fim_line_rate=1.2: use a share in [0, 1]"),
    ({"fim_line_rate": 0.75, "fim_block_rate": 0.5},
     "--data.fim_line_rate=0.75 and --data.fim_block_rate=0.5 are shares of the same FIM samples: their sum must be"),
    ({"fim_block_lines": 1}, "--data.fim_block_lines=1: a block has at least 2 lines"),
])
def test_each_bad_setting_is_a_config_error_naming_its_flag(tmp_path, setting, message):
    with pytest.raises(ConfigError) as raised:
        CodeDataModule(repo=str(tmp_path), **setting)
    assert str(raised.value).startswith(message)


def test_every_scan_problem_is_reported_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as raised:
        CodeDataModule(repo=str(tmp_path), extensions=[], max_file_bytes=0, max_line_length=-1)
    assert [p.split(" ", 1)[0] for p in str(raised.value).split("; ")] == [
        "--data.extensions", "--data.max_file_bytes", "--data.max_line_length"]


def test_a_repo_that_does_not_exist_or_is_a_file_is_named(tmp_path):
    missing, file = tmp_path / "nope", tmp_path / "lib.py"
    file.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"^--data\.repo '.*nope' does not exist\."):
        CodeDataModule(repo=str(missing))
    with pytest.raises(ConfigError, match=r"^--data\.repo '.*lib\.py' is not a directory\."):
        CodeDataModule(repo=str(file))


@pytest.mark.parametrize("setting", [
    {"batch_size": "auto", "effective_batch_size": 1}, {"batch_size": 1, "gradient_accumulation_steps": 1},
    {"seq_len": 2}, {"val_fraction": 0.0}, {"packing": "concat"}, {"fim_rate": 0.0, "fim_spm_rate": 1.0},
    {"fim_rate": None}, {"fim_line_rate": 0.5, "fim_block_rate": 0.5, "fim_block_lines": 2}, {"max_file_bytes": 1, "max_line_length": 1}, {"extensions": [".rs", ".PY"]},
])
def test_the_edge_of_each_allowed_range_is_accepted(tmp_path, setting):
    assert CodeDataModule(repo=str(tmp_path), **setting).hparams.items() >= setting.items()
