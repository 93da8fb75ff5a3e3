"""End-to-end fits with the data options that change how windows are built and loaded: `--data.packing concat`
trains on the plain token stream cut at `--data.seq_len`, and `--data.num_workers 2` trains on the same batches, to
the same weights, as the main process alone."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

SEQ_LEN = 64
# 4 training files, 6 windows of 64 tokens (the last one padded); 2 windows a step: the run is one epoch.
STEPS = 3
CONCAT_FIT = ("--data.packing", "concat", "--data.fim_rate", "0", "--data.batch_size", "2",
              "--data.gradient_accumulation_steps", "1", "--trainer.max_steps", str(STEPS),
              # Dropout on: the weights depend on the global random generator, which no loader may draw from.
              "--model.lora_dropout", "0.05", "--trainer.limit_val_batches", "0", "--generation.base_eval", "false",
              "--generation.repo_prompts", "0", "--generation.fim_prompts", "0", "--generation.prompts", "[]",
              "--trainer.callbacks+=probes.BatchLog")


@pytest.fixture(scope="module")
def concat_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(repository, run with --data.num_workers 0, the same run with --data.num_workers 2)."""
    from helpers import write_fixture_repo
    from helpers import fit_args

    from codetune.__main__ import main

    tmp = tmp_path_factory.mktemp("data-options")
    repo = write_fixture_repo(tmp / "repo", n_copies=2)
    for name, workers in (("main-process", "0"), ("workers", "2")):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(fit_args(repo, tmp / "runs", name, *CONCAT_FIT, "--data.num_workers", workers)) == 0
    return repo, tmp / "runs" / "main-process", tmp / "runs" / "workers"


def batches(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


def token_stream(repo: Path, run_dir: Path) -> tuple[np.ndarray, int]:
    """The training files' tokens (the run's saved tokenizer) with one EOS after each, in window order; EOS's id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run_dir / "base_model" / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    files = json.loads((run_dir / "train_files.json").read_text())
    ids = [tokenizer.encode((repo / path).read_text(), add_special_tokens=False).ids + [eos] for path in files]
    return np.concatenate(ids), eos


@pytest.mark.slow
def test_concat_packing_trains_on_the_token_stream_cut_at_seq_len(concat_runs):
    repo, run_dir, _ = concat_runs
    stream, eos = token_stream(repo, run_dir)
    n_windows = -(-len(stream) // SEQ_LEN)
    logged = batches(run_dir)
    assert [b["step"] for b in logged] == list(range(1, STEPS + 1))
    seen = {}
    for batch in logged:
        for window, ids, positions, labels in zip(batch["sample_ids"], batch["input_ids"], batch["position_ids"],
                                                  batch["labels"]):
            real = stream[window * SEQ_LEN:(window + 1) * SEQ_LEN]
            n = len(real)
            assert ids[:n] == real.tolist(), f"window {window} is not stream[{window * SEQ_LEN}:]"
            # Positions run on across file boundaries, and every real token is a target (no file-start masking).
            assert positions == list(range(n)) + [0] * (SEQ_LEN - n)
            assert labels == real.tolist() + [-100] * (SEQ_LEN - n)
            seen[window] = (ids[:n], labels[:n])
    assert sorted(seen) == list(range(n_windows)), "epoch 0 trains every window once"
    # Files meet inside windows: the token after an EOS (the next file's first) is a target, not masked.
    after_eos = [labels[i + 1] for ids, labels in seen.values() for i in range(len(ids) - 1) if ids[i] == eos]
    assert len(after_eos) == 3 and all(label != -100 for label in after_eos)


@pytest.mark.slow
def test_data_loader_workers_train_on_the_same_batches_to_the_same_weights(concat_runs):
    _, main_process, workers = concat_runs
    reference, loaded = batches(main_process), batches(workers)
    assert {b["num_workers"] for b in reference} == {0} and {b["num_workers"] for b in loaded} == {2}
    for name in ("step", "sample_ids", "input_ids", "position_ids", "labels"):
        assert [b[name] for b in loaded] == [b[name] for b in reference], name
    expected = load_file(main_process / "adapter" / "adapter_model.safetensors")
    adapter = load_file(workers / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(adapter[key], value), key


def test_workers_build_every_epochs_fill_in_the_middle_windows_as_the_main_process_does(fixture_repo):
    """With FIM samples the collator cuts each epoch's windows (`FimEpochs`) in the process it runs in."""
    from codetune.data.datamodule import CodeDataModule

    def two_epochs(num_workers: int) -> list[list[dict[str, list]]]:
        data = CodeDataModule(str(fixture_repo), seq_len=SEQ_LEN, batch_size=2, gradient_accumulation_steps=2,
                              fim_rate=0.5, cache_dir=None, num_workers=num_workers)
        data.setup("fit")
        loader = data.train_dataloader()
        assert loader.num_workers == num_workers
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
            epochs.append([{k: v.tolist() for k, v in batch.items()} for batch in loader])
        return epochs

    reference = two_epochs(0)
    assert two_epochs(2) == reference
    # ... and the two epochs differ where it counts: a FIM window is cut anew in epoch 1.
    by_window = [{w: ids for b in epoch for w, ids in zip(b["sample_ids"], b["input_ids"])} for epoch in reference]
    assert by_window[0].keys() == by_window[1].keys() and by_window[0] != by_window[1]
