"""`codetune prepare`: the data phases alone, written for inspection (arrays, tokenizer, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from codetune.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = str(ROOT / "configs" / "training_config.yaml")


def prepare_args(repo: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["prepare", "--config", DEFAULT, "--data.repo", str(repo), "--out", str(out), "--model.name_or_path",
            "tiny", "--data.seq_len", "64", "--data.cache_dir", str(tmp_path / "token-cache"), *extra]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run from tmp_path, so a stray `runs/` directory would show."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_writes_arrays_tokenizer_and_report(fixture_repo, in_tmp, capsys):
    out = in_tmp / "prepared"
    assert main(prepare_args(fixture_repo, out, in_tmp, "--data.fim_rate", "0")) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["data_report.json", "tokenizer.json", "tokenizer_config.json",
                                                     "train.npy", "val.npy"]
    train, val = np.load(out / "train.npy"), np.load(out / "val.npy")
    assert train.dtype == np.int32 and val.dtype == np.int32
    assert train.ndim == 2 and train.shape[1] == 64 and val.shape[1] == 64 and len(val) >= 1
    report = json.loads((out / "data_report.json").read_text())
    assert report["arrays"] == {"train.npy": list(train.shape), "val.npy": list(val.shape)}
    assert report["files_skipped"] == {"binary": 1, "extension": 1, "ignored": 3}
    assert report["phase_2_tokenize"]["train_windows"] == len(train)
    assert 0.9 < report["packing_efficiency"] <= 1.0
    assert len(report["files"]["train"]) + len(report["files"]["val"]) == 13
    assert not set(report["files"]["train"]) & set(report["files"]["val"])
    assert {"path": "blob.py", "reason": "binary"} in report["skipped"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    # Without FIM each split's windows are its files in order, each followed by EOS, then padding to the end of
    # the last window: decoded, the real tokens are exactly those texts, so no file is lost, cut or leaked.
    for split, windows in (("train", train), ("val", val)):
        files = report["files"][split]
        assert decoded_split(windows, tokenizer) == "".join((fixture_repo / p).read_text() + tokenizer.eos_token
                                                            for p in files), split
    train_text = decoded_split(train, tokenizer)
    assert not any((fixture_repo / path).read_text() in train_text for path in report["files"]["val"])
    assert not (in_tmp / "runs").exists()


def decoded_split(windows: np.ndarray, tokenizer) -> str:
    """The text of a split's windows, after checking that padding only fills the tail of the last window."""
    ids = windows.ravel()
    pad = tokenizer.pad_token_id
    n_real = int((ids != pad).sum())
    assert (ids[:n_real] != pad).all() and (ids[n_real:] == pad).all(), "padding inside the windows"
    assert len(windows) == -(-n_real // windows.shape[1]), "a window of padding only"
    return tokenizer.decode(ids[:n_real])


def test_rerun_replaces_its_own_output_but_never_a_foreign_directory(fixture_repo, in_tmp, capsys):
    out = in_tmp / "prepared"
    assert main(prepare_args(fixture_repo, out, in_tmp)) == 0
    assert main(prepare_args(fixture_repo, out, in_tmp, "--data.seq_len", "32")) == 0
    assert np.load(out / "train.npy").shape[1] == 32
    assert not [p for p in in_tmp.iterdir() if p.name.startswith(".prepared")]  # no temporary left over

    foreign = in_tmp / "important"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(prepare_args(fixture_repo, foreign, in_tmp)) == 2
    assert "--out" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_rerun_refuses_to_delete_a_file_added_to_its_output(fixture_repo, in_tmp, capsys):
    out = in_tmp / "prepared"
    assert main(prepare_args(fixture_repo, out, in_tmp)) == 0
    written = sorted(p.name for p in out.iterdir())
    (out / "train_subset.npy").write_bytes(b"mine")
    capsys.readouterr()
    assert main(prepare_args(fixture_repo, out, in_tmp)) == 2
    err = capsys.readouterr().err
    assert (f"--out {str(out)!r} holds 1 file or folder that no earlier `codetune prepare` wrote there: "
            f"train_subset.npy; replacing the directory would delete it.") in err and "Traceback" not in err
    assert (out / "train_subset.npy").read_bytes() == b"mine"
    assert json.loads((out / "data_report.json").read_text())["output_files"] == written


def test_missing_out_is_one_clear_error(fixture_repo, in_tmp, capsys):
    args = prepare_args(fixture_repo, in_tmp / "x", in_tmp)
    i = args.index("--out")
    assert main(args[:i] + args[i + 2:]) == 2
    err = capsys.readouterr().err
    assert "--out is required" in err and "Traceback" not in err


def test_window_longer_than_the_models_context(fixture_repo, in_tmp, capsys):
    """Only the model's config is read; the error comes before anything is written."""
    from helpers import PY_FILE, RUST_FILE

    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    local = in_tmp / "local-model"
    tokenizer = train_tokenizer([RUST_FILE, PY_FILE], vocab_size=512)
    build_tiny_model(tokenizer, max_position_embeddings=128).save_pretrained(local)
    tokenizer.save_pretrained(local)
    out = in_tmp / "prepared"
    args = prepare_args(fixture_repo, out, in_tmp, "--model.name_or_path", str(local))
    assert main([*args, "--data.seq_len", "256"]) == 2
    assert "--data.seq_len=256 is longer than the model's context (128 tokens)" in capsys.readouterr().err
    assert not out.exists()
    # Within the context, the local model's own tokenizer is the one written.
    assert main([*args, "--data.seq_len", "128"]) == 0
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((local / "tokenizer.json").read_text())


def test_bad_repo_writes_nothing(in_tmp, capsys):
    out = in_tmp / "prepared"
    assert main(prepare_args(in_tmp / "nope", out, in_tmp)) == 2
    assert "--data.repo" in capsys.readouterr().err and not out.exists()
    empty = in_tmp / "empty-repo"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00" * 8)
    assert main(prepare_args(empty, out, in_tmp)) == 2
    assert "nothing to train on" in capsys.readouterr().err and not out.exists()
