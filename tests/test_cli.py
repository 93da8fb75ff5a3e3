"""End-to-end: the CLI trains the tiny model on a fixture repo and leaves a usable run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from codetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "training_config.yaml")
DEMO = str(ROOT / "configs" / "presets" / "demo.yaml")


def fit_args(repo: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", DEFAULT, "--config", DEMO, "--data.repo", str(repo), "--runs_dir", str(runs),
            "--data.cache_dir", str(runs.parent / "token-cache"),
            "--run_name", name, "--data.seq_len", "64", "--data.batch_size", "2",
            "--data.gradient_accumulation_steps", "2", "--generation.max_new_tokens", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "100", *extra]


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, str]:
    from conftest import write_fixture_repo

    tmp = tmp_path_factory.mktemp("cli")
    repo = write_fixture_repo(tmp / "repo")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(fit_args(repo, tmp / "runs", "t", "--trainer.max_steps", "12")) == 0
    return tmp / "runs" / "t", out.getvalue()


def test_fit_writes_manifest_logs_and_prints_run_dir_last(trained_run):
    run_dir, stdout = trained_run
    assert stdout.strip().splitlines()[-1] == str(run_dir)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    for key in ("final_train_loss", "final_val_loss", "final_perplexity"):
        assert isinstance(stats[key], float) and stats[key] > 0
    assert stats["final_perplexity"] == pytest.approx(torch.tensor(stats["final_val_loss"]).exp().item(), rel=1e-5)
    assert stats["optimizer_steps"] == 12
    windows = manifest["phase_results"]["phase_2_tokenize"]["train_windows"]
    steps_per_epoch = -(-windows // 4)
    assert 12 % steps_per_epoch == 0, "fixture sized so the run ends on an epoch boundary"
    assert stats["tokens_trained"] == (12 // steps_per_epoch) * windows * 64
    assert manifest["training_time_minutes"] > 0
    assert manifest["status"] == "completed"
    assert manifest["config"]["data"]["seq_len"] == 64
    assert manifest["phase_results"]["phase_1_scan"]["files_kept"] == 13
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "samples" / "epoch_0.jsonl").exists()
    # Each phase shows one line on the console as it ends, in pipeline order.
    shown = [line.split()[2] for line in stdout.splitlines() if line.startswith("codetune ✓ ")]
    assert shown == list(manifest["phase_results"]), shown
    assert list(manifest["phase_results"]) == ["phase_1_scan", "phase_2_tokenize", "phase_3_model",
                                               "phase_4_training", "phase_5_evaluation", "phase_6_export"]
    assert all(p["status"] == "completed" and p["wall_s"] >= 0 and p["started_at"]
               for p in manifest["phase_results"].values())


def test_tensorboard_has_the_grouped_scalars_and_no_placeholder(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/micro_batch_size", "val/loss",
            "val/perplexity"} <= tags
    assert "hp_metric" not in tags
    assert {"eval/perplexity", "eval/chrf"} <= tags and not any(t.endswith("_base") for t in tags)
    assert events.Scalars("eval/chrf")[0].step == 0, "the base eval is step 0 of the same curve"
    assert all(t.startswith(("train/", "val/", "eval/")) for t in tags), tags  # no `epoch` staircase
    assert events.Tags()["tensors"], "generation samples are logged as text"


def test_final_val_loss_is_measured_after_the_last_step(trained_run):
    run_dir, _ = trained_run
    stats = json.loads((run_dir / "MANIFEST.json").read_text())["phase_results"]["phase_4_training"]["training_stats"]
    assert scalars(run_dir, "val/loss")[-1] == pytest.approx(stats["final_val_loss"], rel=1e-6)


def test_loss_goes_down(trained_run):
    run_dir, _ = trained_run
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 12
    # 12 steps at the demo's settings (LoRA + trained embeddings) take the mean loss from ~6.2 to ~2.9;
    # step-to-step noise is ~0.2, so a drop of 2 nats cannot come from noise.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 2.0, losses
    val = scalars(run_dir, "val/loss")
    assert val[-1] < val[0] - 2.0, val


def is_trained_weight(key: str) -> bool:
    """LoRA factors, or the full copies of the layers the demo preset trains (modules_to_save)."""
    return "lora_" in key or any(f"{layer}." in key for layer in ("embed_tokens", "lm_head"))


def test_adapter_loads_with_plain_transformers_and_peft(trained_run):
    from conftest import RUST_FILE
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "base_model")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(is_trained_weight(k) for k in adapter)
    ids = tokenizer(RUST_FILE.replace("Counter", "Counter0"), return_tensors="pt")["input_ids"][:, :64]
    base_loss = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")(input_ids=ids, labels=ids).loss
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "adapter")
    tuned_loss = model(input_ids=ids, labels=ids).loss
    # The exported adapter carries the training: on a training file it predicts far better than the base.
    assert torch.isfinite(tuned_loss) and tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)


def test_checkpoint_holds_only_lora_weights_and_round_trips(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state = ckpt["state_dict"]
    assert state and all(is_trained_weight(k) for k in state)
    assert any("lora_" in k for k in state)
    # Resume from the checkpoint with nothing left to train: the exported adapter equals the checkpoint.
    config = str(run_dir / "config.yaml")
    args = ["fit", "--config", config, "--runs_dir", str(tmp_path), "--run_name", "resumed",
            "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    assert main(args) == 0
    adapter = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    by_suffix = {k.removeprefix("model.").replace(".modules_to_save", "").replace(".default", ""): v
                 for k, v in state.items()}
    assert set(by_suffix) == set(adapter)
    for key, value in adapter.items():
        assert torch.equal(value, by_suffix[key]), key


def test_bad_repo_is_one_clear_error(tmp_path, capsys):
    assert main(fit_args(tmp_path / "missing", tmp_path / "runs", "bad")) == 2
    err = capsys.readouterr().err
    assert "--data.repo" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_repo_with_nothing_to_train_on(tmp_path, capsys):
    repo = tmp_path / "empty_repo"
    repo.mkdir()
    (repo / "data.bin").write_bytes(b"\x00" * 100)
    assert main(fit_args(repo, tmp_path / "runs", "bad")) == 2
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "--data.extensions" in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_uncached_hub_model_offline_is_one_clear_error(tmp_path, fixture_repo, capsys):
    code = main(fit_args(fixture_repo, tmp_path / "runs", "hub", "--model.name_or_path", "codetune-tests/not-a-model"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--model.name_or_path 'codetune-tests/not-a-model'" in err and "'tiny'" in err and "Traceback" not in err
    # The error surfaced once the run had started: its directory is removed, not left half-made.
    assert not (tmp_path / "runs" / "hub").exists()


def test_window_longer_than_context(tmp_path, fixture_repo, capsys):
    # The tiny model's context is max(seq_len, 4096); a hub-style local model with a short one must refuse.
    from transformers import LlamaConfig, LlamaForCausalLM

    from codetune.model.tiny import build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(["fn main() {}\n" * 50], vocab_size=300)
    model = build_tiny_model(tokenizer, max_position_embeddings=32)
    model.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    assert isinstance(model, LlamaForCausalLM) and isinstance(model.config, LlamaConfig)
    code = main(fit_args(fixture_repo, tmp_path / "runs", "bad", "--model.name_or_path", str(tmp_path / "short")))
    assert code == 2
    err = capsys.readouterr().err
    assert "--data.seq_len=64" in err and "context (32 tokens)" in err


class DecoderLayerCalls(Callback):
    """Counts grad-enabled forward calls of the first decoder layer's MLP (training and its recomputation).

    transformers checkpoints a layer's `forward`, not its `__call__`, so the hook sits on a module inside it,
    and it is a *pre*-hook: the recomputation stops as soon as the last saved tensor is rebuilt, before
    the MLP returns."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.causal_lm.get_decoder().layers[0].mlp.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += int(torch.is_grad_enabled())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_rust_config_on_a_local_model_dir(tmp_path, fixture_repo, checkpointing):
    """`make train-rust MODEL=<local dir>`: the real loading path (no 'tiny'), the Rust config's LoRA r16,
    and gradient checkpointing that really recomputes each layer in backward."""
    from conftest import PY_FILE, RUST_FILE

    from codetune.cli import build_cli
    from codetune.model.tiny import build_tiny_model, train_tokenizer

    local = tmp_path / "local-model"
    tokenizer = train_tokenizer([RUST_FILE, PY_FILE], vocab_size=512)
    build_tiny_model(tokenizer).save_pretrained(local)
    tokenizer.save_pretrained(local)
    counter = {"class_path": f"{__name__}.{DecoderLayerCalls.__name__}"}
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "training_config_rust.yaml"),
                     "--data.repo", str(fixture_repo), "--model.name_or_path", str(local),
                     "--model.gradient_checkpointing", str(checkpointing).lower(),
                     "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                     "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
                     "--generation.max_new_tokens", "4", f"--trainer.callbacks+={json.dumps(counter)}",
                     "--data.cache_dir", str(tmp_path / "token-cache"),
                     "--runs_dir", str(tmp_path / "runs"), "--run_name", "rust"])
    model = json.loads((tmp_path / "runs" / "rust" / "MANIFEST.json").read_text())["phase_results"]["phase_3_model"]
    assert model["name_or_path"] == str(local) and model["quantized_4bit"] is False
    assert model["gradient_checkpointing"] is checkpointing
    # LoRA r16 on 7 projections of 2 layers (hidden 128, MLP 384): r x (in + out) per projection.
    per_layer = 16 * (4 * (128 + 128) + 2 * (128 + 384) + (384 + 128))
    assert model["trainable_parameters"] == 2 * per_layer
    calls = next(c for c in cli.trainer.callbacks if isinstance(c, DecoderLayerCalls)).calls
    # 2 optimizer steps x 2 micro-batches; checkpointing runs each layer's forward again in backward.
    assert calls == 4 * (2 if checkpointing else 1)


def test_batch_size_auto_keeps_the_effective_batch(tmp_path, fixture_repo, capsys):
    args = ["fit", "--config", DEFAULT, "--config", DEMO, "--data.repo", str(fixture_repo),
            "--runs_dir", str(tmp_path / "runs"), "--run_name", "auto", "--data.cache_dir", str(tmp_path / "cache"),
            "--data.seq_len", "64", "--data.batch_size", "auto", "--generation.max_new_tokens", "2",
            "--generation.repo_prompts", "0", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2"]
    assert main(args) == 2
    assert "--data.batch_size auto needs --data.effective_batch_size" in capsys.readouterr().err
    assert main([*args, "--data.effective_batch_size", "6"]) == 0
    manifest = json.loads((tmp_path / "runs" / "auto" / "MANIFEST.json").read_text())
    # On CPU there is no card to fit: the whole optimizer batch is one micro-batch.
    assert manifest["config"]["data"]["batch_size"] == "auto"
    assert scalars(tmp_path / "runs" / "auto", "train/micro_batch_size") == [6.0, 6.0]
    assert manifest["phase_results"]["phase_3_model"]["vram_plan"]["predicted_peak_gib"] > 0


def test_make_clean_keeps_the_runs_and_clean_runs_removes_them():
    import os
    import subprocess

    # Outside any make that runs the tests (`make test` in CI): a nested make prints its directory changes.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def make(*args: str) -> str:
        return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True, env=env).stdout

    assert "runs" not in make("-n", "clean").split()
    assert make("-n", "clean-runs").split() == ["rm", "-rf", "runs"]
    listed = make("help")
    assert "make clean-runs" in listed


def test_progress_bar_names_the_runs_limits_and_stops_once():
    from types import SimpleNamespace
    from unittest import mock

    from codetune.cli import RunProgressBar

    bar = RunProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=3)  # --trainer.max_steps alone
    assert bar._get_train_description(0).strip() == "Epoch 0 (max 3 steps)"
    bar._trainer = SimpleNamespace(max_epochs=10, max_steps=-1)
    assert bar._get_train_description(2).strip() == "Epoch 2/9"
    bar.progress = mock.Mock()
    bar.on_train_end(None, None)
    bar.teardown(None, None, "fit")
    # Stopped when training ends (before the end-of-run lines print), and not again: each stop off a terminal
    # prints a line.
    assert bar.progress.stop.call_count == 1


def test_lightnings_chatter_is_dropped_and_the_rest_kept():
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from codetune.cli import quiet_lightning

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_lightning():
                rank_zero_info("GPU available: False, used: False")
                rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
                rank_zero_info("`Trainer.fit` stopped: `max_steps=3` reached.")
                rank_zero_info("codetune data: 28 train / 2 val files")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                warnings.warn("set --data.seq_len lower", UserWarning)
            rank_zero_info("GPU available: False, used: False")  # outside, Lightning speaks as before
    finally:
        logger.removeHandler(handler)
    assert seen == ["codetune data: 28 train / 2 val files", "GPU available: False, used: False"]
    assert [str(w.message) for w in caught] == ["set --data.seq_len lower"]


def test_a_tiny_fit_prints_one_line_per_phase_and_no_lightning_chatter(tmp_path, fixture_repo):
    import os
    import subprocess

    from conftest import fit_command, subprocess_env

    command = fit_command(fixture_repo, tmp_path / "runs", "quiet", "--trainer.max_steps", "2",
                          "--trainer.enable_progress_bar", "true")
    summary = command.index("--trainer.enable_model_summary")
    del command[summary:summary + 2]  # the default now
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True)
    output = result.stdout + result.stderr
    for chatter in ("GPU available", "TPU available", "Tip:", "Seed set to", "Loading `train_dataloader`",
                    "`Trainer.fit` stopped", "LeafSpec", "FLOPs", "Epoch 0/-2"):
        assert chatter not in output, chatter
    assert "Epoch 0/5 (max 2 steps)" in result.stdout  # the demo preset: 6 epochs
    lines = result.stdout.rstrip().splitlines()
    # The bar is drawn before the end-of-run lines, not again after them.
    assert lines[-1] == str(tmp_path / "runs" / "quiet") and lines[-2].startswith("codetune ✓ phase_6_export")
