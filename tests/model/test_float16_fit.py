"""A float16 run (Turing's `auto`, emulated on the CPU with a real GradScaler) of a base whose residual stream leaves
float16's range: stopped at the base evaluation, before any step, with a message naming the layer and what works on
the card; with the residual scaling (the default) the same run trains, its base held-out loss close to fp32's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from codetune.__main__ import main
from codetune.model.messages import non_finite_base_message, precision_fixes

FP16_MAX = 65504.0
MASSIVE_NEURON, MASSIVE_CHANNEL = 7, 5


def massive_base(directory: Path, texts: list[str]) -> Path:
    """The tiny Llama with one massive residual channel: layer 0's MLP writes up to 2e5 into channel 5 on the
    repository's tokens (through one intermediate neuron, as massive activations come from a few), all weights well
    inside float16's range."""
    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_tiny_model(tokenizer).eval()
    ids = torch.tensor([tokenizer("".join(texts))["input_ids"][:256]])
    mlp = model.model.layers[0].mlp
    seen = {}
    hook = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("act", args[0]))
    with torch.no_grad():
        mlp.up_proj.weight[MASSIVE_NEURON] *= 1e4
        model(ids)
        hook.remove()
        term = (seen["act"][..., MASSIVE_NEURON] * mlp.down_proj.weight[MASSIVE_CHANNEL, MASSIVE_NEURON]).abs()
        mlp.down_proj.weight[MASSIVE_CHANNEL, MASSIVE_NEURON] *= 2e5 / term.max()
    assert max(p.abs().max().item() for p in model.parameters()) < 1e3
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from helpers import PY_FILE, RUST_FILE

    return massive_base(tmp_path_factory.mktemp("massive-base"), [RUST_FILE, PY_FILE] * 4)


def fit_args(repo: Path, tmp: Path, base: Path, name: str, *extra: str) -> list[str]:
    from helpers import DEFAULT

    return ["fit", "--config", DEFAULT, "--data.repo", str(repo), "--model.name_or_path", str(base),
            "--runs_dir", str(tmp / "runs"), "--run_name", name, "--data.cache_dir", str(tmp / "token-cache"),
            "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
            "--model.lora_dropout", "0.0", "--generation.repo_prompts", "0", "--generation.fim_prompts", "0",
            "--generation.prompts", "[]", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
            "--checkpoint_every_n_steps", "1", *extra]


FLOAT16 = ("--model.dtype", "float16", "--trainer.plugins", "probes.CPUFloat16Precision")


def phases(run_dir: Path) -> dict:
    return json.loads((run_dir / "MANIFEST.json").read_text())["phase_results"]


def test_an_overflowing_float16_base_stops_before_any_step(fixture_repo, tmp_path, base_dir, capsys):
    status = main(fit_args(fixture_repo, tmp_path, base_dir, "off", *FLOAT16, "--model.float16_residual_scale", "1"))
    err = " ".join(capsys.readouterr().err.split())
    assert status == 2
    assert "the base model's held-out loss is nan before any training step" in err
    assert "its activations overflow float16's range, first at the output of" in err and "layers.0" in err
    assert "--model.float16_residual_scale 32" in err and "--model.dtype float32" in err
    run_dir = tmp_path / "runs" / "off"
    assert not (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "adapter").exists()


def test_with_the_residual_scaling_it_trains_and_its_base_loss_is_fp32s(fixture_repo, tmp_path, base_dir):
    assert main(fit_args(fixture_repo, tmp_path, base_dir, "fp32", "--model.dtype", "float32")) == 0
    assert main(fit_args(fixture_repo, tmp_path, base_dir, "scaled", *FLOAT16)) == 0
    fp32, scaled = phases(tmp_path / "runs" / "fp32"), phases(tmp_path / "runs" / "scaled")
    base = {name: math.log(p["phase_5_evaluation"]["base"]["perplexity"]) for name, p in (("fp32", fp32),
                                                                                         ("fp16", scaled))}
    assert base["fp16"] == pytest.approx(base["fp32"], rel=2e-3)
    stats = scaled["phase_4_training"]["training_stats"]
    assert math.isfinite(stats["final_train_loss"]) and math.isfinite(stats["final_val_loss"])
    assert scaled["phase_3_model"]["float16_residual_scaling"]["residual_scale"] == 32
    assert fp32["phase_3_model"]["float16_residual_scaling"] is None


def test_the_advice_is_right_for_the_card():
    """bfloat16 only where the card has it; below 8.0 float16 headroom or float32; nothing about dtype otherwise."""
    turing = precision_fixes(torch.float16, (7, 5), 32, "sdpa")
    assert not any("--model.dtype bfloat16" in fix for fix in turing)
    assert turing[0].startswith("a larger --model.float16_residual_scale (now 32, e.g. 256)")
    assert "compute capability 7.5" in turing[-1] and "--model.dtype float32" in turing[-1]
    assert any("--model.attn_implementation sdpa" in f for f in precision_fixes(torch.float16, (7, 5), 32, "eager"))
    assert precision_fixes(torch.float16, (7, 5), 1, "sdpa")[0].startswith("--model.float16_residual_scale 32")
    assert precision_fixes(torch.float16, (8, 6), 32, "sdpa") == [
        "--model.dtype bfloat16 (what auto trains in on this card; float16 ends at 65504)"]
    assert precision_fixes(torch.bfloat16, (8, 6), 32, "sdpa") == precision_fixes(torch.float32, None, 32, "sdpa") == []
    damaged = non_finite_base_message(float("nan"), "model.layers.1", torch.bfloat16, [])
    assert "weights may be damaged" in damaged and "model.layers.1" in damaged
