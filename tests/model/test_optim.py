"""Optimizer choice: bitsandbytes' 8-bit AdamW for QLoRA on CUDA, AdamW elsewhere, each selectable; and the
bitsandbytes facts the choice and the memory plan rest on."""

from __future__ import annotations

import pytest
import torch

from codetune.memory.estimate import plan_memory
from codetune.memory.persistent import BNB_MIN_8BIT_SIZE, optimizer_state_bytes
from codetune.memory.shapes import ModelShape, TrainingShape
from codetune.model.messages import optimizer_oom_message
from codetune.model.optim import build_optimizer, resolve_optimizer

QWEN_CODER_1_5B = ModelShape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, head_dim=128,
                             qkv_bias=True)
# PagedAdamW8bit allocates a state in CUDA managed memory only for tensors of at least this many values.
PAGED_MIN_VALUES = 100_000


@pytest.mark.parametrize(("name", "quantized", "cuda", "expected"), [
    ("auto", True, True, "adamw_8bit"),   # QLoRA on CUDA: 8-bit state, not paged
    ("paged_adamw_8bit", True, True, "paged_adamw_8bit"),
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


def lora_tensors(rank: int) -> list[tuple[int, int]]:
    """``(values, bytes per value)`` of every fp32 LoRA A (r x in) and B (out x r) on the seven projections."""
    layer = [(n, 4) for n_in, n_out, _ in QWEN_CODER_1_5B.projections().values() for n in (rank * n_in, n_out * rank)]
    return layer * QWEN_CODER_1_5B.num_hidden_layers


@pytest.mark.parametrize(("rank", "paged", "fp32_state", "adamw", "adamw_8bit"), [
    (8, 0, 56, 73_859_072, 19_437_824),    # k/v B are 256 x 8 = 2048 values: fp32 state
    (16, 84, 0, 147_718_144, 37_506_560),  # gate/up B and down A, 8960 x 16 = 143,360 values: paged
])
def test_what_the_8bit_state_and_paging_amount_to_for_the_1_5b_model(rank, paged, fp32_state, adamw, adamw_8bit):
    tensors = lora_tensors(rank)
    assert len(tensors) == 392
    assert sum(n >= PAGED_MIN_VALUES for n, _ in tensors) == paged
    assert sum(n < BNB_MIN_8BIT_SIZE for n, _ in tensors) == fp32_state
    assert optimizer_state_bytes(tensors, "adamw") == adamw
    assert optimizer_state_bytes(tensors, "adamw_8bit") == adamw_8bit
    for name, expected in (("adamw", adamw), ("adamw_8bit", adamw_8bit)):
        assert plan_memory(QWEN_CODER_1_5B, TrainingShape(lora_rank=rank, optimizer=name)).optimizer_state == expected


def test_bitsandbytes_keeps_the_state_the_plan_counts():
    """AdamW8bit on CPU: 8-bit moments from BNB_MIN_8BIT_SIZE values on, and the bytes of `optimizer_state_bytes`."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(1, BNB_MIN_8BIT_SIZE - 1), (1, BNB_MIN_8BIT_SIZE),
                                                                   (256, 8), (8, 1536)]]
    optimizer = build_optimizer("adamw_8bit", params, lr=1e-3, weight_decay=0.0)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    states = [optimizer.state[p] for p in params]
    assert [s["state1"].dtype for s in states] == [torch.float32, torch.uint8, torch.float32, torch.uint8]
    # The 256-entry quantization maps (qmap1/qmap2) are shared by every tensor, so not per-tensor state.
    held = sum(v.numel() * v.element_size() for s in states for k, v in s.items()
               if torch.is_tensor(v) and not k.startswith("qmap"))
    assert held == optimizer_state_bytes([(p.numel(), 4) for p in params], "adamw_8bit")


@pytest.mark.parametrize(("values", "paged"), [(PAGED_MIN_VALUES - 1, False), (PAGED_MIN_VALUES, True)])
def test_paged_adamw_8bit_pages_only_tensors_of_100000_values_or_more(monkeypatch, values, paged):
    """bitsandbytes' own threshold (`get_state_buffer`), on a non-CPU tensor whose managed allocation is faked."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    managed = []

    def get_paged(*shape, dtype=torch.float32, device=None):
        managed.append(shape)
        return torch.empty(shape, dtype=dtype, device="meta")

    monkeypatch.setattr(F, "get_paged", get_paged)
    monkeypatch.setattr(F, "fill", lambda *args, **kwargs: None)
    param = torch.nn.Parameter(torch.empty(values, device="meta"))  # not "cpu": bitsandbytes never pages CPU state
    optimizer = bnb.optim.PagedAdamW8bit([param], lr=1e-3)
    optimizer.get_state_buffer(param, dtype=torch.uint8)
    assert managed == ([(values,)] if paged else [])


def test_the_optimizer_oom_message_quotes_the_state_and_what_8bit_saves():
    tensors = lora_tensors(16)
    with_adamw = optimizer_oom_message(0, "CUDA out of memory", "adamw", tensors)
    assert "140.9 MiB with adamw for 18,464,768 trainable values" in with_adamw
    assert "--model.optimizer adamw_8bit (35.8 MiB of state, 105.1 MiB less)" in with_adamw
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        message = optimizer_oom_message(0, None, name, tensors)
        assert f"35.8 MiB with {name} for 18,464,768 trainable values" in message
        assert "--model.optimizer" not in message and "host memory" not in message


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
