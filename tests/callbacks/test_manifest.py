"""Manifest writer: the model phase records which base the run trained on; training time is training time; an
interrupted run says so."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from codetune.callbacks.generation_eval import GenerationEval
from codetune.callbacks.interrupt import TrainingInterrupted
from codetune.callbacks.manifest import ManifestWriter
from codetune.storage import MANIFEST_NAME
from codetune.run.manifest import Manifest
from helpers import ROOT


def loaded_module(**extra) -> SimpleNamespace:
    """What on_fit_start reads of the module once configure_model loaded the base."""
    return SimpleNamespace(
        model=SimpleNamespace(get_nb_trainable_parameters=lambda: (10, 100)),
        causal_lm=SimpleNamespace(is_loaded_in_4bit=False, dtype=torch.float32, is_activation_checkpointing=False),
        hparams=SimpleNamespace(name_or_path="org/coder", modules_to_save=[]), optimizer_name="adamw",
        **{"vram_plan": None, "attention_plan": None, "float16_scaling": None, "base_revision": None, **extra})


@pytest.mark.parametrize("record", [
    {"kind": "hub", "revision": "0123456789abcdef0123456789abcdef01234567", "requested": "main"},
    None,  # a module that records nothing
])
def test_the_model_phase_records_the_base_revision(tmp_path, record):
    writer = ManifestWriter()
    writer._trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    writer.manifest = Manifest(tmp_path)
    module = loaded_module(base_revision=record) if record else loaded_module()
    writer.on_fit_start(writer._trainer, module)
    phase = json.loads((tmp_path / MANIFEST_NAME).read_text())["phase_results"]["phase_3_model"]
    assert phase["base_revision"] == record
    assert phase["name_or_path"] == "org/coder" and phase["trainable_parameters"] == 10


EVAL_S = 1000.0  # what each generation eval takes on the faked clock: a big eval on a slow card


def test_training_time_excludes_the_generation_eval(tmp_path, fixture_repo, monkeypatch):
    from codetune.__main__ import main

    import codetune.callbacks.generation_eval

    clock = {"offset": 0.0}
    real = time.perf_counter

    def fake_clock() -> float:
        return real() + clock["offset"]

    monkeypatch.setattr(time, "perf_counter", fake_clock)
    if hasattr(codetune.callbacks.generation_eval, "perf_counter"):  # imported by name: the eval's own clock
        monkeypatch.setattr(codetune.callbacks.generation_eval, "perf_counter", fake_clock)
    generate = GenerationEval._generate

    def slow_generate(self, *args, **kwargs):
        clock["offset"] += EVAL_S  # the eval's clock sees it too: it is what phase_5_evaluation reports
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationEval, "_generate", slow_generate)
    started = time.perf_counter()
    assert main(["fit", "--config", str(ROOT / "configs" / "training_config.yaml"), "--config",
                 str(ROOT / "tests" / "tiny.yaml"), "--data.repo", str(fixture_repo), "--runs_dir",
                 str(tmp_path / "runs"), "--run_name", "t", "--data.cache_dir", str(tmp_path / "cache"),
                 "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
                 "--generation.max_new_tokens", "4", "--generation.repo_prompts", "2", "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]) == 0
    elapsed = time.perf_counter() - started
    manifest = json.loads((tmp_path / "runs" / "t" / MANIFEST_NAME).read_text())
    evaluation = manifest["phase_results"]["phase_5_evaluation"]
    assert evaluation["base"] is not None and len(evaluation["epochs"]) == 1  # one eval before, one at the end
    assert evaluation["eval_seconds"] == pytest.approx(2 * EVAL_S, abs=elapsed - 2 * EVAL_S)
    training_s = 60 * manifest["training_time_minutes"]
    # Two steps and a validation take seconds; the 1000 s epoch-end eval ran inside the training loop.
    assert 0 < training_s < elapsed - 2 * EVAL_S
    assert manifest["phase_results"]["phase_4_training"]["wall_s"] == pytest.approx(training_s, abs=1e-2)
    assert 60 * manifest["segments"][0]["training_minutes"] == pytest.approx(training_s, abs=1e-2)


@pytest.mark.parametrize("checkpoint", [Path("runs/t/checkpoints/last.ckpt"), None], ids=["at-step", "second-signal"])
def test_an_interrupt_marks_the_phase_segment_and_run_interrupted_not_failed(tmp_path, capsys, checkpoint):
    writer = ManifestWriter()
    writer._trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=14, is_global_zero=True,
                                      datamodule=SimpleNamespace(report={}, preparing=None))
    writer.manifest = Manifest(tmp_path)
    writer.manifest.start_segment(resumed_from=None)
    writer.manifest.update_segment(start_step=0, end_step=14, training_minutes=0.25)  # by the interrupt's checkpoint
    writer.manifest.start_phase("phase_4_training")
    stop = TrainingInterrupted(signal.SIGINT, 14, checkpoint)
    writer.on_exception(writer._trainer, None, stop)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    phase = data["phase_results"]["phase_4_training"]
    assert (phase["status"], phase["wall_s"]) == ("interrupted", 15.0)
    assert phase["interrupted"] == ("SIGINT during training at step 14: checkpoint runs/t/checkpoints/last.ckpt"
                                    if checkpoint else "SIGINT during training at step 14: no checkpoint written")
    assert data["status"] == "interrupted" and data["segments"][0]["status"] == "interrupted"
    assert capsys.readouterr().out == ""  # the interrupt's own stop line says it, once
