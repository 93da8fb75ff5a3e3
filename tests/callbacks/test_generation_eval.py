"""Generation eval: base vs tuned on held-out files, samples, manifest, and its OOM back-off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.generation_eval import GenerationEval, comparison_table
from codetune.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    from conftest import write_fixture_repo

    tmp = tmp_path_factory.mktemp("eval")
    repo = write_fixture_repo(tmp / "repo")
    build_cli(["fit", "--config", str(ROOT / "configs" / "training_config.yaml"),
               "--config", str(ROOT / "configs" / "presets" / "demo.yaml"), "--data.repo", str(repo),
               "--data.cache_dir", str(tmp / "cache"), "--runs_dir", str(tmp / "runs"), "--run_name", "ev",
               "--data.seq_len", "256", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "1",
               "--trainer.max_epochs", "8", "--trainer.enable_progress_bar", "false",
               "--generation.max_new_tokens", "32"])
    return tmp / "runs" / "ev"


@pytest.mark.slow
def test_tuning_improves_held_out_completion_and_perplexity(evaluated_run):
    phase = json.loads((evaluated_run / "MANIFEST.json").read_text())["phase_results"]["phase_5_evaluation"]
    base, final = phase["base"], phase["final"]
    assert phase["status"] == "completed" and phase["repo_prompts"] > 5
    assert len(phase["epochs"]) == 8
    # The base is a random model: chance-level completions and a perplexity near the vocabulary size.
    assert final["perplexity"] < base["perplexity"] / 20, (base, final)
    assert final["chrf"] > base["chrf"] + 0.05, (base, final)
    assert phase["delta"]["chrf"] == pytest.approx(final["chrf"] - base["chrf"])
    assert phase["eval_seconds"] > 0


@pytest.mark.slow
def test_samples_are_written_and_logged(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [json.loads(line) for line in (evaluated_run / "samples" / "base.jsonl").read_text().splitlines()]
    last = [json.loads(line) for line in (evaluated_run / "samples" / "epoch_7.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in base} == {"repo", "language"} and len(base) == len(last)
    repo = [s for s in last if s["kind"] == "repo"]
    assert all(s["truth"] and s["path"] and s["new_tokens"] <= 32 for s in repo)
    events = EventAccumulator(str(evaluated_run / "tensorboard"))
    events.Reload()
    text_tags = events.Tags()["tensors"]
    assert any(t.startswith("samples/base/") for t in text_tags) and any(t.startswith("samples/tuned/") for t in text_tags)


class _Tokenizer:
    eos_token_id, pad_token_id = 2, 0


def test_generation_halves_its_batch_on_oom_and_skips_at_one(monkeypatch):
    callback = GenerationEval(prompts=["a"], batch_size=4)
    calls = []

    def fake_batch(pl_module, texts):
        calls.append(len(texts))
        if len(texts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [(t + "!", 1) for t in texts]

    monkeypatch.setattr(callback, "_generate_batch", fake_batch)
    module = type("M", (), {"device": torch.device("cpu")})()
    assert callback._generate(module, ["x", "y", "z"]) == [("x!", 1), ("y!", 1), ("z!", 1)]
    assert calls == [3, 2, 1, 1, 1]

    def always_oom(pl_module, texts):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(callback, "_generate_batch", always_oom)
    trainer = type("T", (), {"default_root_dir": "/nonexistent", "loggers": [], "global_step": 0})()
    with pytest.warns(UserWarning, match="ran out of memory at batch 1 and was skipped"):
        result = callback._evaluate(trainer, module, "epoch_0", 1.0)
    assert result["skipped"] == "out of memory" and result["metrics"]["perplexity"] == pytest.approx(2.718281828)


CUBLAS_OOM = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


def test_a_cublas_allocation_failure_is_out_of_memory_and_other_errors_propagate(monkeypatch):
    """cuBLAS and cuDNN report a failed workspace allocation as a RuntimeError, not torch.OutOfMemoryError."""
    callback = GenerationEval(prompts=["a"], batch_size=4)
    calls = []

    def cublas_oom_above_one(pl_module, texts):
        calls.append(len(texts))
        if len(texts) > 1:
            raise RuntimeError(CUBLAS_OOM)
        return [(t + "!", 1) for t in texts]

    monkeypatch.setattr(callback, "_generate_batch", cublas_oom_above_one)
    module = type("M", (), {"device": torch.device("cpu")})()
    assert callback._generate(module, ["x", "y", "z"]) == [("x!", 1), ("y!", 1), ("z!", 1)]
    assert calls == [3, 2, 1, 1, 1]

    def always(error):
        def generate_batch(pl_module, texts):
            raise error
        return generate_batch

    trainer = type("T", (), {"default_root_dir": "/nonexistent", "loggers": [], "global_step": 0})()
    monkeypatch.setattr(callback, "_generate_batch", always(RuntimeError(CUBLAS_OOM)))
    with pytest.warns(UserWarning, match="'epoch_2' ran out of memory at batch 1 and was skipped"):
        result = callback._evaluate(trainer, module, "epoch_2", 1.0)
    assert result["skipped"] == "out of memory" and result["metrics"]["perplexity"] == pytest.approx(2.718281828)

    unrelated = RuntimeError("expected all tensors to be on the same device")
    monkeypatch.setattr(callback, "_generate_batch", always(unrelated))
    with pytest.raises(RuntimeError) as raised:
        callback._evaluate(trainer, module, "epoch_3", 1.0)
    assert raised.value is unrelated


def test_comparison_table_marks_improvements():
    from rich.console import Console

    phase = {"base": {"perplexity": 100.0, "next_line_exact_match": 0.0, "chrf": 0.1, "syntax_valid": 0.5},
             "final": {"perplexity": 10.0, "next_line_exact_match": 0.25, "chrf": 0.3, "syntax_valid": 0.4}}
    console = Console(record=True, width=100)
    console.print(comparison_table(phase))
    text = console.export_text()
    assert "held-out perplexity" in text and "-90" in text and "+0.2" in text
    # Lower perplexity and higher scores are green, a drop in a score red.
    from callbacks.generation_eval import change_cell
    from codetune.compare import HIGHER, LOWER

    assert "green" in change_cell(-90.0, LOWER) and "green" in change_cell(0.2, HIGHER)
    assert "red" in change_cell(-0.1, HIGHER) and "red" in change_cell(5.0, LOWER)
    assert change_cell(None, LOWER) == "" and change_cell(0.0, HIGHER) == "0"


def test_bad_settings_name_the_flag():
    from codetune.errors import ConfigError

    with pytest.raises(ConfigError, match="--generation.repo_prompts=-1.*--generation.batch_size=0"):
        GenerationEval(repo_prompts=-1, batch_size=0)


@pytest.mark.slow
def test_evaluating_does_not_change_what_is_learned(tmp_path, fixture_repo):
    """The eval draws from the global RNG (data loaders); it must not shift training's dropout masks."""
    losses = {}
    for base_eval, repo_prompts in (("false", "0"), ("true", "16")):
        name = f"e{base_eval}"
        build_cli(["fit", "--config", str(ROOT / "configs" / "training_config.yaml"),
                   "--config", str(ROOT / "configs" / "presets" / "demo.yaml"), "--data.repo", str(fixture_repo),
                   "--data.cache_dir", str(tmp_path / "cache"), "--runs_dir", str(tmp_path / "runs"),
                   "--run_name", name, "--data.seq_len", "64", "--data.batch_size", "2",
                   "--data.gradient_accumulation_steps", "1", "--trainer.max_epochs", "2",
                   "--trainer.enable_progress_bar", "false", "--generation.max_new_tokens", "4",
                   "--generation.base_eval", base_eval, "--generation.repo_prompts", repo_prompts,
                   "--model.lora_dropout", "0.05"])  # dropout on: the masks come from the global RNG
        stats = json.loads((tmp_path / "runs" / name / "MANIFEST.json").read_text())
        losses[base_eval] = stats["phase_results"]["phase_4_training"]["training_stats"]["final_train_loss"]
    assert losses["true"] == losses["false"]
