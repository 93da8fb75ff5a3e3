"""Generation eval: base vs tuned on held-out files, samples, manifest, and its OOM back-off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.generation_eval import Completion, GenerationEval, Request, comparison_table
from codetune.cli import build_cli
from codetune.eval.prompts import RepoPrompt

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
    # One tag per prompt; the base is its step 0, then one step per epoch.
    repo_tags = [t for t in events.Tags()["tensors"] if t.startswith("samples/repo_")]
    assert len(repo_tags) == len(repo)
    steps = [e.step for e in events.Tensors(repo_tags[0])]
    assert steps[0] == 0 and len(steps) == 9 and steps == sorted(steps)


def _requests(texts):
    return [Request(t, lambda text: False, 4) for t in texts]


def _exclaimed(pl_module, requests):
    return [Completion(r.text + "!", 1, False) for r in requests]


def test_generation_halves_its_batch_on_oom_and_skips_at_one(monkeypatch):
    callback = GenerationEval(prompts=["a"], batch_size=4)
    calls = []

    def fake_batch(pl_module, requests):
        calls.append(len(requests))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return _exclaimed(pl_module, requests)

    monkeypatch.setattr(callback, "_generate_batch", fake_batch)
    module = type("M", (), {"device": torch.device("cpu")})()
    assert [c.text for c in callback._generate(module, _requests(["x", "y", "z"]))] == ["x!", "y!", "z!"]
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

    def cublas_oom_above_one(pl_module, requests):
        calls.append(len(requests))
        if len(requests) > 1:
            raise RuntimeError(CUBLAS_OOM)
        return _exclaimed(pl_module, requests)

    monkeypatch.setattr(callback, "_generate_batch", cublas_oom_above_one)
    module = type("M", (), {"device": torch.device("cpu")})()
    assert [c.text for c in callback._generate(module, _requests(["x", "y", "z"]))] == ["x!", "y!", "z!"]
    assert calls == [3, 2, 1, 1, 1]

    def always(error):
        def generate_batch(pl_module, requests):
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


def test_comparison_table_marks_improvements_and_reads_well():
    from rich.console import Console

    phase = {"base": {"perplexity": 2095.892723, "next_line_exact_match": 0.25, "chrf": 0.0630174, "syntax_valid": 0.5},
             "final": {"perplexity": 1705.265925, "next_line_exact_match": 0.243635, "chrf": 0.0126279,
                       "syntax_valid": 0.5}}
    console = Console(record=True, width=100)
    console.print(comparison_table(phase))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in console.export_text().splitlines() if line.count("│") == 5}
    # Rates with three decimals in every column, perplexity with four significant digits (-390.6268 as -391).
    assert rows["held-out perplexity"] == ["2,096", "1,705", "-391"]
    assert rows["next-line exact match"] == ["0.250", "0.244", "-0.006"]
    assert rows["completion chrF"] == ["0.063", "0.013", "-0.050"]
    assert rows["syntax-valid completions"] == ["0.500", "0.500", "0.000"]
    # Lower perplexity and higher scores are green, a drop in a score red.
    from callbacks.generation_eval import change_cell
    from codetune.compare import HIGHER, LOWER

    assert "green" in change_cell(-90.0, LOWER) and "green" in change_cell(0.2, HIGHER)
    assert "red" in change_cell(-0.1, HIGHER) and "red" in change_cell(5.0, LOWER)
    assert change_cell(None, LOWER) == "" and change_cell(0.0, HIGHER) == "0"
    assert change_cell(0.0, HIGHER, rate=True) == "0.000" and change_cell(0.2, HIGHER, rate=True) == "[green]+0.200[/]"


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


def _prompt(i: int) -> RepoPrompt:
    return RepoPrompt(f"src/f{i}.py", "python", f"def f{i}():\n", f"    return {i}\n", 1, "")


class _Clock:
    """A fake `perf_counter`: every generated batch takes `batch_seconds`."""

    def __init__(self, batch_seconds: float) -> None:
        self.now, self.batch_seconds, self.batches = 0.0, batch_seconds, []

    def __call__(self) -> float:
        return self.now

    def generate_batch(self, pl_module, requests):
        self.now += self.batch_seconds
        self.batches.append([r.text for r in requests])
        return [Completion("\n    return 1\n", 5, False) for _ in requests]


def test_a_budget_hit_fixes_the_prompt_set_that_every_later_eval_scores(monkeypatch, tmp_path):
    callback = GenerationEval(prompts=["def analyze_"], batch_size=1, max_seconds=25)
    callback._repo_prompts = [_prompt(i) for i in range(4)]
    clock = _Clock(batch_seconds=10)
    monkeypatch.setattr("callbacks.generation_eval.perf_counter", clock)
    monkeypatch.setattr(callback, "_generate_batch", clock.generate_batch)
    module = type("M", (), {"device": torch.device("cpu")})()
    trainer = type("T", (), {"default_root_dir": str(tmp_path), "loggers": [], "global_step": 0})()

    # Batches start at 0, 10 and 20 s; the one at 30 s is past the 25 s budget: 3 of 5 prompts done.
    with pytest.warns(UserWarning, match=r"'base' hit --generation.max_seconds=25: 3 of 5 prompts.*scores the 3 repo"):
        base = callback._evaluate(trainer, module, "base", 1.0)
    callback.results["base"] = base
    assert base["budget_hit"] == {"prompts_done": 3, "prompts": 5, "max_seconds": 25}
    assert base["metrics"]["chrf"] is not None and base["eval_seconds"] == 30
    assert callback._scored_repo_prompts == 3

    # The next eval generates those 3 and the language prompt only: within budget, nothing to report.
    clock.batches.clear()
    callback.max_seconds = 100
    tuned = callback._evaluate(trainer, module, "epoch_0", 1.0)
    assert clock.batches == [["def f0():"], ["def f1():"], ["def f2():"], ["def analyze_"]]
    assert "budget_hit" not in tuned and tuned["metrics"] == base["metrics"]

    # An eval that cannot finish the set reports no completion metrics rather than figures on fewer prompts.
    callback.max_seconds = 15
    with pytest.warns(UserWarning, match=r"'epoch_1' hit .*2 of 4 prompts.*not reported.*the 3 repo prompts"):
        cut = callback._evaluate(trainer, module, "epoch_1", 1.0)
    assert cut["metrics"] == {"perplexity": pytest.approx(2.718281828), "next_line_exact_match": None,
                              "chrf": None, "syntax_valid": None}
    callback.results["epochs"] = [{"epoch": 0, "step": 5, **tuned}, {"epoch": 1, "step": 10, **cut}]
    phase = callback.manifest_phases()["phase_5_evaluation"]
    assert phase["budget_hit"] == [{"eval": "base", "prompts_done": 3, "prompts": 5, "max_seconds": 25},
                                   {"eval": "epoch_1", "prompts_done": 2, "prompts": 4, "max_seconds": 15}]
    assert phase["repo_prompts_scored"] == 3 and phase["eval_seconds"] == 30 + 40 + 20 == callback.eval_seconds
    assert phase["base_eval_seconds"] == 30

    # A resumed run keeps the set.
    resumed = GenerationEval(prompts=["def analyze_"])
    resumed.load_state_dict(callback.state_dict())
    assert resumed._scored_repo_prompts == 3 and resumed.results == callback.results
    assert GenerationEval()._scored_repo_prompts is None


def test_without_a_budget_every_prompt_is_generated(monkeypatch, tmp_path):
    callback = GenerationEval(prompts=["fn process"], batch_size=2)
    callback._repo_prompts = [_prompt(i) for i in range(3)]
    clock = _Clock(batch_seconds=1000)
    monkeypatch.setattr("callbacks.generation_eval.perf_counter", clock)
    monkeypatch.setattr(callback, "_generate_batch", clock.generate_batch)
    module = type("M", (), {"device": torch.device("cpu")})()
    trainer = type("T", (), {"default_root_dir": str(tmp_path), "loggers": [], "global_step": 0})()
    result = callback._evaluate(trainer, module, "base", None)
    assert len(clock.batches) == 2 and "budget_hit" not in result and callback._scored_repo_prompts == 3
    samples = [json.loads(line) for line in (tmp_path / "samples" / "base.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in samples] == ["repo"] * 3 + ["language"] and samples[0]["eos"] is False


def test_a_stopped_completion_is_judged_as_cut_on_its_scored_part():
    from callbacks.generation_eval import _judged_for_syntax

    truth = "    x = 1\n    return x\n"
    # Stopped once complete, or run on past that: the same two lines are judged, as a cut text.
    assert _judged_for_syntax(Completion("\n    x = 1\n", 6, False), truth) == ("\n    x = 1\n", True)
    assert _judged_for_syntax(Completion("\n    x = 1\n    y = (\n", 12, False), truth) == ("\n    x = 1\n", True)
    # Ended before the scored part was complete: judged whole, and strictly when it ended with EOS.
    assert _judged_for_syntax(Completion("\n    pass", 3, True), truth) == ("\n    pass", False)
    assert _judged_for_syntax(Completion("\n    pass", 3, False), truth) == ("\n    pass", True)
