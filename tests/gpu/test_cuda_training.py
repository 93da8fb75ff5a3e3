"""On a CUDA card: an NF4 + LoRA step trains, packed windows stay isolated at batch > 1, float16 trains under a
GradScaler. Tiny models built from a config (seconds, offline); skipped without CUDA.

Run with `pytest -m gpu tests/gpu` (`bench/gpu_check.py` runs them as its section f).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import load_gpu_check
import torch

from codetune.data.packing import pack_windows
from codetune.memory.shapes import DEFAULT_LORA_TARGETS
from codetune.model.loading import apply_lora, enable_gradient_checkpointing, keep_adapter_input_dtype, load_causal_lm
from codetune.model.loss import causal_lm_loss_sum
from codetune.model.optim import build_optimizer
from codetune.data.tokenizer import train_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")
CODE = "def add(a, b):\n    return a + b\n\nclass Counter:\n    def __init__(self):\n        self.n = 0\n"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 (grouped KV heads, tied embeddings, q/k/v biases) with a 300-token tokenizer, saved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer([CODE * 20], vocab_size=300)
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_an_nf4_lora_step_trains_on_cuda(qwen_dir):
    import bitsandbytes as bnb

    model = load_causal_lm(qwen_dir, True, torch.bfloat16, False, "sdpa", CUDA)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    enable_gradient_checkpointing(model)
    model = apply_lora(model, 8, 16, 0.0, list(DEFAULT_LORA_TARGETS))
    keep_adapter_input_dtype(model)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in lora.values())
    optimizer = build_optimizer("paged_adamw_8bit", list(lora.values()), 1e-3, 0.0)
    ids = torch.randint(3, 300, (2, 64), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    before = {n: p.detach().clone() for n, p in lora.items()}

    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.get_base_model().get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        loss_sum, count = causal_lm_loss_sum(hidden, model.get_base_model().get_output_embeddings(), ids, 32)
    (loss_sum / count).backward()
    optimizer.step()

    assert int(count) == 2 * 63 and torch.isfinite(loss_sum)
    b_grads = [p.grad for n, p in lora.items() if "lora_B" in n]
    # B starts at zero, so its gradient is the first to be non-zero; every gradient is finite.
    assert all(torch.isfinite(p.grad).all() for p in lora.values())
    assert all(g.abs().max() > 0 for g in b_grads)
    moved = [n for n, p in lora.items() if "lora_B" in n and not torch.equal(p, before[n])]
    assert len(moved) == len(b_grads)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
def test_packed_windows_stay_isolated_at_batch_3_on_cuda(qwen_dir, attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    from codetune.model.module import CodeLoRAModule

    gpu_check = load_gpu_check("gpucheck.isolation")
    module = CodeLoRAModule(name_or_path=str(qwen_dir), attn_implementation=attn, lora_dropout=0.0)
    module.model = apply_lora(load_causal_lm(qwen_dir, True, torch.bfloat16, False, attn, CUDA), 8, 16, 0.0,
                              list(DEFAULT_LORA_TARGETS))
    keep_adapter_input_dtype(module.model)
    module.model.eval()
    rng = np.random.default_rng(0)
    files = [rng.integers(3, 300, size=n).astype(np.int32) for n in (20, 35, 12, 50, 28, 40, 17, 33)]
    windows = pack_windows(files, 64, eos_id=2, pad_id=0, mode="isolated")
    windows = type(windows)(windows.input_ids[:3], windows.position_ids[:3], windows.n_real[:3])

    errors = gpu_check.isolation_errors(module, windows, CUDA, torch.bfloat16)

    tolerance = gpu_check.ISOLATION_RTOL[16]
    assert errors["segments"] >= 6
    assert errors["rel_diff"] <= tolerance, errors
    # ...while attending across files (positions that do not restart) changes them by far more.
    assert errors["control_rel_diff"] >= gpu_check.CONTROL_FACTOR * tolerance, errors


def test_float16_trains_under_a_grad_scaler_with_fp32_lora_weights(tmp_path):
    from helpers import write_fixture_repo
    from safetensors.torch import load_file

    from codetune.cli import build_cli

    repo = write_fixture_repo(tmp_path / "repo")
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "training_config.yaml"),
                     "--model.name_or_path", "tiny", "--model.quantization", "nf4", "--model.dtype", "float16",
                     "--data.repo", str(repo), "--runs_dir", str(tmp_path / "runs"), "--run_name", "fp16",
                     "--data.cache_dir", str(tmp_path / "token-cache"), "--data.seq_len", "64",
                     "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
                     "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--generation.max_new_tokens", "4",
                     "--generation.repo_prompts", "1"])

    assert str(cli.trainer.precision) == "16-mixed"
    scaler = cli.trainer.precision_plugin.scaler
    assert scaler is not None and scaler.is_enabled()
    assert all(p.dtype == torch.float32 for p in cli.model.parameters() if p.requires_grad)
    run = tmp_path / "runs" / "fp16"
    manifest = json.loads((run / "MANIFEST.json").read_text())
    model_phase = manifest["phase_results"]["phase_3_model"]
    assert model_phase["quantized_4bit"] and model_phase["optimizer"] == "adamw_8bit"
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    assert stats["optimizer_steps"] == 3 and np.isfinite(stats["final_train_loss"])
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in adapter.values())
    assert any("lora_B" in k and w.abs().max() > 0 for k, w in adapter.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_no_attention_call_runs_the_math_kernel_on_this_card(qwen_dir, dtype):
    """A training step of micro-batches with and without file boundaries: torch's dispatcher picks a fused kernel
    for every SDPA call (bf16 only where the card runs it natively)."""
    from codetune.model.attention import record_sdpa_calls

    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 has no fused attention kernel below compute capability 8.0 (codetune refuses it)")
    model = apply_lora(load_causal_lm(qwen_dir, True, dtype, False, "sdpa", CUDA), 8, 16, 0.0,
                       list(DEFAULT_LORA_TARGETS))
    keep_adapter_input_dtype(model)
    ids = torch.randint(3, 300, (2, 64), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    plain = torch.arange(64, device=CUDA).repeat(2, 1)
    packed = plain.clone()
    packed[:, 40:] -= 40
    with record_sdpa_calls() as calls, torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for positions in (plain, packed):
            hidden = model.get_base_model().get_decoder()(input_ids=ids, position_ids=positions,
                                                          use_cache=False).last_hidden_state
            loss, n = causal_lm_loss_sum(hidden, model.get_base_model().get_output_embeddings(), ids, 32)
            (loss / n).backward()
    assert len(calls) == 2 * 2 and all(call.device == "cuda" for call in calls)
    assert [call.picked for call in calls].count("math") == 0, [call.picked for call in calls]
