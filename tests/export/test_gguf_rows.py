"""The GGUF adapter's arithmetic and refusals, without a trained run: llama.cpp's q/k row order, the exact pair
of a layer trained in full, the tensor-type summary, and every problem told at once."""

from __future__ import annotations

import pytest
import torch

from codetune.errors import ConfigError
from codetune.export.adapter import Adapter, LoraLayer
from codetune.export.gguf import full_rank_pair, gguf_adapter, rotary_rows_to_ggml, type_summary


def test_q_and_k_reordering_keeps_attention_scores_under_ggmls_interleaved_rotary():
    """The reordering's meaning: rotary embeddings in Hugging Face's rotate-half layout on W x give the same
    attention scores as GGML's interleaved rotary (llama.cpp's Llama) on the reordered rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    heads, kv_heads, d, positions = 4, 2, 8, 5
    q, k = torch.randn(heads * d, positions), torch.randn(kv_heads * d, positions)
    theta = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.arange(positions).float()[:, None] * theta[None, :]  # [positions, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    hf_q, hf_k = (t.T.reshape(positions, -1, d).transpose(0, 1)[None] for t in (q, k))
    hf_q, hf_k = apply_rotary_pos_emb(hf_q, hf_k, cos[None], sin[None])
    hf_scores = hf_q[0] @ hf_k[0].repeat_interleave(heads // kv_heads, 0).transpose(1, 2)

    def ggml_rope(x: torch.Tensor, n: int) -> torch.Tensor:
        x = x.T.reshape(positions, n, d // 2, 2)
        even, odd = x[..., 0], x[..., 1]
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([even * c - odd * s, even * s + odd * c], -1).reshape(positions, n, d).transpose(0, 1)

    gq, gk = ggml_rope(rotary_rows_to_ggml(q, heads), heads), ggml_rope(rotary_rows_to_ggml(k, kv_heads), kv_heads)
    ggml_scores = gq @ gk.repeat_interleave(heads // kv_heads, 0).transpose(1, 2)
    torch.testing.assert_close(ggml_scores, hf_scores, rtol=1e-5, atol=1e-5)
    # Row 2i of a head is HF row i, row 2i+1 is HF row i + d/2.
    order = [h * d + j // 2 + (j % 2) * (d // 2) for h in range(heads) for j in range(d)]
    assert torch.equal(rotary_rows_to_ggml(q, heads), q[order])


def test_a_layer_trained_in_full_is_an_exact_pair_under_llama_cpps_alpha_over_rank():
    torch.manual_seed(0)
    alpha, delta = 16.0, torch.randn(6, 4)
    a, b = full_rank_pair(delta, "blk.0.ffn_up.weight", alpha)
    rank = b.shape[1]  # llama.cpp reads the rank from B
    torch.testing.assert_close(alpha / rank * (b @ a), delta, rtol=0, atol=1e-6)
    # The token embedding's pair is flipped: llama.cpp adds B @ A[token], so A holds delta's rows.
    a, b = full_rank_pair(delta, "token_embd.weight", alpha)
    assert torch.equal(a, delta)
    torch.testing.assert_close(alpha / b.shape[1] * (a @ b.T), delta, rtol=0, atol=1e-6)


def test_type_summary_says_why_q8_0_kept_f16():
    assert type_summary({"f32": 1}, "f32", 8) == "f32: 1 tensor"
    assert type_summary({"q8_0": 14, "f16": 14}, "q8_0", 8) == (
        "q8_0: 14 tensors; f16: 14 tensors (LoRA B rows are rank 8 values long, not a multiple of Q8_0's block "
        "of 32)")


def pair(module: str) -> LoraLayer:
    return LoraLayer(module, torch.zeros(8, 64), torch.zeros(64, 8))


QWEN2_TIED = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "tie_word_embeddings": True}


def test_every_problem_is_told_at_once_in_order():
    adapter = Adapter({"r": 8, "lora_alpha": 16, "use_dora": True, "bias": "all"},
                      (pair("model.layers.0.self_attn.q_proj"), pair("lm_head"), pair("model.layers.0.weird_proj")), {})
    with pytest.raises(ConfigError) as raised:
        gguf_adapter(adapter, QWEN2_TIED, lambda name: torch.zeros(1), "ollama")
    assert str(raised.value) == (
        "--to ollama: the adapter is DoRA (use_dora), which llama.cpp does not load: train a plain LoRA; the adapter "
        "trains biases (bias='all'), which llama.cpp does not load: train with bias 'none'; the adapter has a LoRA on "
        "lm_head, which this base ties to its token embeddings (tie_word_embeddings), so its GGUF has no output "
        "tensor to add it to: train without lm_head in --model.lora_target_modules; gguf's tensor names for qwen2 "
        "have none for model.layers.0.weird_proj: train without that layer in --model.lora_target_modules.")


def test_an_unknown_architecture_is_refused_with_the_adapters_own_problems():
    adapter = Adapter({"r": 8, "lora_alpha": 16, "use_dora": True}, (pair("model.layers.0.q"),), {})
    with pytest.raises(ConfigError, match=r"^--to gguf: the adapter is DoRA .*; the base's architecture "
                                          r"\(none in config.json\) is not one codetune exports to GGUF"):
        gguf_adapter(adapter, {"num_hidden_layers": 1}, lambda name: torch.zeros(1))


def test_the_q_and_k_rows_of_a_llama_base_are_reordered_and_the_others_kept():
    torch.manual_seed(0)
    layers = tuple(LoraLayer(f"model.layers.0.self_attn.{p}", torch.randn(8, 64), torch.randn(out, 8))
                   for p, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)))
    base = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    content = gguf_adapter(Adapter({"r": 8, "lora_alpha": 16}, layers, {}), base, lambda name: torch.zeros(1))
    tensors = dict(content.tensors)
    assert content.architecture == "llama" and content.alpha == 16.0
    assert list(tensors) == [f"blk.0.attn_{k}.weight.lora_{p}" for k in "qkv" for p in "ab"]
    assert (tensors["blk.0.attn_q.weight.lora_b"] == rotary_rows_to_ggml(layers[0].b, 4).numpy()).all()
    assert (tensors["blk.0.attn_k.weight.lora_b"] == rotary_rows_to_ggml(layers[1].b, 2).numpy()).all()
    assert (tensors["blk.0.attn_v.weight.lora_b"] == layers[2].b.numpy()).all()
    assert (tensors["blk.0.attn_q.weight.lora_a"] == layers[0].a.numpy()).all()
