"""Optimizer choice: paged 8-bit AdamW for QLoRA on CUDA, AdamW elsewhere, each selectable."""

from __future__ import annotations

import pytest
import torch

from codetune.model.optim import build_optimizer, resolve_optimizer


@pytest.mark.parametrize(("name", "quantized", "cuda", "expected"), [
    ("auto", True, True, "paged_adamw_8bit"),
    ("auto", True, False, "adamw"),   # 4-bit on CPU: the tests' path, plain AdamW
    ("auto", False, True, "adamw"),   # 16-bit LoRA on CUDA
    ("adamw_8bit", False, False, "adamw_8bit"),
    ("adamw", True, True, "adamw"),
])
def test_resolution(name, quantized, cuda, expected):
    assert resolve_optimizer(name, quantized, cuda) == expected


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_each_optimizer_steps_and_8bit_keeps_one_byte_moments(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: bitsandbytes quantizes its state
    target = torch.randn(64, 128)
    optimizer = build_optimizer(name, [weight], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = (weight - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.9 * losses[0]
    moments = [v for v in optimizer.state[weight].values() if torch.is_tensor(v) and v.shape == weight.shape]
    assert len(moments) == 2
    assert {m.dtype for m in moments} == ({torch.uint8} if name == "adamw_8bit" else {torch.float32})


def test_fit_with_the_8bit_optimizer_records_it(tmp_path, fixture_repo):
    import json
    from pathlib import Path

    from codetune.cli import build_cli

    root = Path(__file__).resolve().parents[2]
    cli = build_cli(["fit", "--config", str(root / "configs" / "training_config.yaml"), "--data.repo", str(fixture_repo),
               "--model.name_or_path", "tiny", "--model.quantization", "none", "--model.optimizer", "adamw_8bit",
               "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
               "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "1",
               "--generation.max_new_tokens", "2", "--data.cache_dir", str(tmp_path / "cache"),
               "--runs_dir", str(tmp_path / "runs"), "--run_name", "opt8"])
    manifest = json.loads((tmp_path / "runs" / "opt8" / "MANIFEST.json").read_text())
    assert manifest["phase_results"]["phase_3_model"]["optimizer"] == "adamw_8bit"
    assert manifest["status"] == "completed"
    # The fit really stepped bitsandbytes' 8-bit AdamW, not torch's (which the name alone would not show).
    optimizer = cli.model.optimizers().optimizer
    assert type(optimizer).__name__ == "AdamW8bit" and type(optimizer).__module__.startswith("bitsandbytes")
    assert optimizer.state, "it took steps"
