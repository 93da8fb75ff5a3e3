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


@pytest.mark.slow
def test_fit_with_the_8bit_optimizer_steps_every_adapter_with_one_byte_moments(tmp_path, fixture_repo):
    import json
    from pathlib import Path

    from codetune.cli import build_cli

    root = Path(__file__).resolve().parents[2]
    # LoRA r32 on the tiny model's 128-wide layers: every adapter matrix has >= 4096 elements, the size from which
    # bitsandbytes keeps a tensor's moments in 8 bits (smaller ones stay fp32 whatever the optimizer).
    cli = build_cli(["fit", "--config", str(root / "configs" / "training_config.yaml"), "--data.repo", str(fixture_repo),
               "--model.name_or_path", "tiny", "--model.quantization", "none", "--model.optimizer", "adamw_8bit",
               "--model.lora_rank", "32", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
               "--trainer.enable_progress_bar", "false", "--data.seq_len", "64", "--data.batch_size", "2",
               "--data.gradient_accumulation_steps", "1", "--generation.repo_prompts", "0",
               "--generation.fim_prompts", "0", "--generation.prompts", "[]", "--data.cache_dir",
               str(tmp_path / "cache"), "--runs_dir", str(tmp_path / "runs"), "--run_name", "opt8"])
    manifest = json.loads((tmp_path / "runs" / "opt8" / "MANIFEST.json").read_text())
    assert manifest["phase_results"]["phase_3_model"]["optimizer"] == "adamw_8bit"
    assert manifest["status"] == "completed"
    # bitsandbytes' 8-bit AdamW, not torch's (which the recorded name alone would not show) ...
    optimizer = cli.model.optimizers().optimizer
    assert type(optimizer).__name__ == "AdamW8bit" and type(optimizer).__module__.startswith("bitsandbytes")
    # ... holding exactly the trainable tensors (28 LoRA matrices: 7 targets x A/B x 2 layers) ...
    trainable = [p for p in cli.model.parameters() if p.requires_grad]
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trainable) == 28 and {id(p) for p in stepped} == {id(p) for p in trainable}
    # ... each stepped twice, with both moments in one byte per element ...
    for p in trainable:
        state = optimizer.state[p]
        assert state["step"] == 2
        assert (state["state1"].dtype, state["state2"].dtype) == (torch.uint8, torch.uint8)
        assert state["state1"].shape == state["state2"].shape == p.shape
    # ... and the steps moved the weights: peft starts every lora_B at zero.
    lora_b = [p for n, p in cli.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(p.abs().max() > 0 for p in lora_b)
