"""--data.max_val_windows keeps an evenly spread, deterministic subset of the held-out windows, the report counts
both, and validation (its loader, under DDP too) runs exactly on the subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError

from helpers import write_fixture_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return write_fixture_repo(tmp_path_factory.mktemp("val") / "repo", n_copies=12)


def _setup(repo: Path, cache: Path, max_val_windows: int | None) -> CodeDataModule:
    dm = CodeDataModule(repo=str(repo), tokenizer="tiny", seq_len=16, batch_size=2, gradient_accumulation_steps=1,
                        val_fraction=0.3, fim_rate=0.0, cache_dir=str(cache), max_val_windows=max_val_windows)
    dm.setup("fit")
    return dm


def test_the_subset_is_evenly_spread_and_both_counts_are_reported(repo, tmp_path):
    every = _setup(repo, tmp_path / "cache", None)
    held_out = len(every.val_windows)
    assert held_out > 20  # enough to spread 7 over
    kept = _setup(repo, tmp_path / "cache", 7)
    expected = (np.arange(7) * held_out) // 7
    assert np.array_equal(kept.val_windows.input_ids, every.val_windows.input_ids[expected])
    assert np.array_equal(kept.val_windows.n_real, every.val_windows.n_real[expected])
    assert kept.report["phase_2_tokenize"]["val_windows"] == held_out
    assert kept.report["phase_2_tokenize"]["val_windows_used"] == 7
    assert every.report["phase_2_tokenize"]["val_windows_used"] == held_out
    assert np.array_equal(kept.train_windows.input_ids, every.train_windows.input_ids)  # training is untouched
    batches = list(kept.val_dataloader())
    assert [b["sample_ids"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6]]


def test_a_limit_above_the_count_keeps_every_window(repo, tmp_path):
    every = _setup(repo, tmp_path / "cache", None)
    dm = _setup(repo, tmp_path / "cache", len(every.val_windows))
    assert np.array_equal(dm.val_windows.input_ids, every.val_windows.input_ids)


@pytest.mark.parametrize("bad", [0, -3])
def test_a_limit_below_one_names_the_flag(tmp_path, bad):
    with pytest.raises(ConfigError, match=rf"^--data\.max_val_windows={bad}: must be a positive integer, or null"):
        CodeDataModule(repo=str(tmp_path), max_val_windows=bad)
