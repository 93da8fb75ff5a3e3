"""Scaling the residual stream by 1/c: float16 overflow avoided, the model's function (and its LoRA gradients and
saved memory) unchanged, clamping measured as the worse alternative, unfit models refused."""

from __future__ import annotations

import copy

import pytest
import torch

from codetune.errors import ConfigError
from codetune.model.float16 import (check_residual_scale, first_non_finite_layer, residual_scaling_manifest,
                                    scale_residual_stream)
from codetune.model.loading import apply_lora, enable_gradient_checkpointing, load_causal_lm

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MASSIVE_CHANNEL, MASSIVE_NEURON = 5, 7
FP16_MAX = 65504.0


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # Dimensions in multiples of 32, as the fused fp16 kernels of a real card want them.
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=256, tie_word_embeddings=True,
                         max_position_embeddings=64)
    return Qwen2ForCausalLM(config).train()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def massive_model(input_ids):
    """A tiny Qwen2 (fp32) with one massive residual channel: layer 0's MLP writes up to 2e5 into channel 5
    (through one intermediate neuron, as massive activations come from a few), on some tokens only."""
    model = _tiny_qwen2().eval()
    mlp = model.model.layers[0].mlp
    seen = {}
    hook = mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("act", args[0]))
    with torch.no_grad():
        # Both weights stay far inside float16's range (|w| < 600): only the activations overflow.
        mlp.up_proj.weight[MASSIVE_NEURON] *= 1e4
        model.model(input_ids)
        hook.remove()
        term = (seen["act"][..., MASSIVE_NEURON] * mlp.down_proj.weight[MASSIVE_CHANNEL, MASSIVE_NEURON]).abs()
        mlp.down_proj.weight[MASSIVE_CHANNEL, MASSIVE_NEURON] *= 2e5 / term.max()
    return model


def _final_hidden(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids).last_hidden_state.float()


def _residual_after_layer_0(model, input_ids) -> torch.Tensor:
    seen = {}
    hook = model.model.layers[0].register_forward_hook(lambda module, args, output: seen.setdefault("out", output))
    _final_hidden(model, input_ids)
    hook.remove()
    return seen["out"]


def _ordinary_channel_error(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error of the worst token over the channels that carry information: the massive one is ~sqrt(64)
    after the final norm whatever happens and would hide what happens to the rest."""
    keep = [c for c in range(reference.shape[-1]) if c != MASSIVE_CHANNEL]
    error = (hidden[..., keep] - reference[..., keep]).norm(dim=-1) / reference[..., keep].norm(dim=-1)
    return error.max().item()


def _clamp_layer_outputs(model) -> list:
    """transformers' T5 fix for float16: clamp each layer's output to +-(65504 - 1000)."""
    bound = FP16_MAX - 1000

    def clamp(module, args, output):
        return output.clamp(-bound, bound)

    return [layer.register_forward_hook(clamp) for layer in model.model.layers]


def test_scaling_avoids_float16_overflow_that_clamping_only_hides(massive_model, input_ids):
    reference = _final_hidden(massive_model, input_ids)
    residual = _residual_after_layer_0(massive_model, input_ids)
    assert residual.abs().max().item() == pytest.approx(2e5, rel=1e-3)
    assert 0 < (residual.abs() > FP16_MAX).sum() < residual.shape[0] * residual.shape[1]  # some tokens only
    half = copy.deepcopy(massive_model).half()

    assert not torch.isfinite(_final_hidden(half, input_ids)).all()

    scaling = scale_residual_stream(half, 32)
    scaled = _final_hidden(half, input_ids)
    scaling.remove()
    assert torch.isfinite(scaled).all()
    # fp16's own error, not the scaling's: the worst token (one without a massive value) is off by 8.1e-3 here,
    # as in plain fp16 when the massive channel is made 10x smaller so nothing overflows; massive tokens by 1e-3.
    scaled_error = _ordinary_channel_error(scaled, reference)
    assert scaled_error < 2e-2

    hooks = _clamp_layer_outputs(half)
    clamped = _final_hidden(half, input_ids)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(clamped).all()
    # The clamped token's RMS is ~3x too small, so its other channels come out ~3x too large (measured 2.1).
    clamp_error = _ordinary_channel_error(clamped, reference)
    assert clamp_error > 1.0 and clamp_error > 100 * scaled_error


def test_scaling_does_not_change_a_model_that_does_not_overflow(input_ids):
    model = _tiny_qwen2().eval()
    plain = _final_hidden(model, input_ids)
    scaling = scale_residual_stream(model, 32)
    scaled = _final_hidden(model, input_ids)
    scaling.remove()
    # Multiplying by a power of two is exact: fp32 computes the same numbers.
    assert (scaled - plain).abs().max().item() <= 1e-6 * plain.abs().max().item()

    half = model.half()
    plain_half = _final_hidden(half, input_ids)
    scaling = scale_residual_stream(half, 32)
    scaled_half = _final_hidden(half, input_ids)
    assert torch.isfinite(scaled_half).all()
    # Exact in fp16 too, but for components that the scaling makes subnormal (true values below 6.1e-5 * 32): their
    # last bits differ and flip a rounding downstream, a few fp16 ulps (9.8e-4 relative) at most (measured 8e-4).
    assert (scaled_half - plain_half).abs().max().item() <= 4e-3 * plain_half.abs().max().item()


def test_remove_restores_the_model(input_ids):
    model = _tiny_qwen2().eval()
    before = _final_hidden(model, input_ids)
    epsilons = [m.variance_epsilon for m in model.modules() if hasattr(m, "variance_epsilon")]
    scaling = scale_residual_stream(model, 32)
    assert scaling.hooks == 1 + 2 * 2 and scaling.manifest() == {"residual_scale": 32, "hooks": 5}
    assert model.model.norm.variance_epsilon == model.config.rms_norm_eps / 32**2
    with pytest.raises(RuntimeError, match="already scaled by 32"):
        scale_residual_stream(model, 32)
    scaling.remove()
    assert [m.variance_epsilon for m in model.modules() if hasattr(m, "variance_epsilon")] == epsilons
    assert torch.equal(_final_hidden(model, input_ids), before)
    # Its hooks are gone: scaling anew (a different factor) is exact again.
    scaling = scale_residual_stream(model, 4)
    assert torch.allclose(_final_hidden(model, input_ids), before, rtol=0, atol=1e-6)
    scaling.remove()


def _lora(model):
    """LoRA on every projection, with a non-zero B so every factor gets a gradient."""
    model = apply_lora(model, 8, 16, 0.0, LORA_TARGETS)
    generator = torch.Generator().manual_seed(0)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


def _saved_bytes_and_loss(model, input_ids) -> tuple[int, torch.Tensor]:
    """The bytes autograd saves for backward in one forward (each storage once), and the loss."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    return sum(storages.values()), loss


def _loss_and_grads(model, input_ids) -> tuple[int, float, dict[str, torch.Tensor]]:
    model.zero_grad()
    saved, loss = _saved_bytes_and_loss(model, input_ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return saved, loss.item(), grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_same_training(model, input_ids) -> None:
    """Loss and every LoRA gradient are those of the unscaled model, and backward keeps as many bytes."""
    saved, loss, grads = _loss_and_grads(model, input_ids)
    scaling = scale_residual_stream(model, 32)
    saved_scaled, loss_scaled, grads_scaled = _loss_and_grads(model, input_ids)
    scaling.remove()
    assert saved_scaled == saved
    assert loss_scaled == pytest.approx(loss, rel=1e-6)
    assert len(grads) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert all(grads_scaled[n].norm() > 0 for n in grads)
    assert max(_relative_error(grads_scaled[n], grads[n]) for n in grads) < 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    _tiny_qwen2().save_pretrained(path)
    return path


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "nf4"])
def test_lora_training_is_unchanged_and_saves_no_more(model_dir, input_ids, quantize):
    """The hooks sit on peft's wrappers (base and adapter delta scaled together), over bitsandbytes' 4-bit layers
    too, and add nothing to what backward keeps."""
    model = _lora(load_causal_lm(model_dir, quantize, torch.float32, False, "sdpa", torch.device("cpu")))
    _assert_same_training(model, input_ids)


def test_residual_gradients_are_scale_times_larger(model_dir, input_ids):
    """What a GradScaler sees: gradients of the stream are c times larger (parameter gradients are not)."""
    model = _lora(load_causal_lm(model_dir, False, torch.float32, False, "sdpa", torch.device("cpu")))
    layer = model.base_model.model.model.layers[0]
    grads = []
    for scale in (1, 32):
        scaling = scale_residual_stream(model, scale)
        hook = layer.register_forward_hook(lambda module, args, output: output.register_hook(grads.append) and None)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        hook.remove()
        scaling.remove()
    assert _relative_error(grads[1], 32 * grads[0]) < 1e-6


def test_gradient_checkpointing_recomputes_the_scaling(model_dir, input_ids):
    model = _lora(load_causal_lm(model_dir, False, torch.float32, False, "sdpa", torch.device("cpu")))
    # Turned on before the scaling: the embedding's requires-grad hook is then registered first.
    enable_gradient_checkpointing(model.base_model.model)
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    calls = []
    hook = v_proj.register_forward_hook(lambda module, args, output: calls.append(output.abs().max().item()))
    _assert_same_training(model, input_ids)
    hook.remove()
    # Forward and recompute, unscaled then scaled: the recompute ran the scaling hook again.
    assert len(calls) == 4
    assert calls[2] == pytest.approx(calls[0] / 32, rel=1e-6) and calls[3] == pytest.approx(calls[2], rel=1e-6)


def test_disabled_adapter_stays_exact(model_dir, input_ids):
    model = _lora(load_causal_lm(model_dir, False, torch.float32, False, "sdpa", torch.device("cpu"))).eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=input_ids).logits
    scaling = scale_residual_stream(model, 32)
    with torch.no_grad(), model.disable_adapter():
        base_scaled = model(input_ids=input_ids).logits
    with torch.no_grad():
        adapted_scaled = model(input_ids=input_ids).logits
    scaling.remove()
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
    assert _relative_error(base_scaled, base) < 1e-6 and _relative_error(adapted_scaled, adapted) < 1e-6
    assert _relative_error(adapted, base) > 1e-3  # the adapter is on where it should be


def test_first_non_finite_layer_names_where_float16_overflowed(massive_model, input_ids):
    half = copy.deepcopy(massive_model).half()
    assert first_non_finite_layer(half, lambda: _final_hidden(half, input_ids)) == "model.layers.0"
    scaling = scale_residual_stream(half, 32)
    assert first_non_finite_layer(half, lambda: _final_hidden(half, input_ids)) is None
    scaling.remove()
    peft_model = apply_lora(half, 8, 16, 0.0, ["v_proj"])
    found = first_non_finite_layer(peft_model, lambda: peft_model(input_ids=input_ids))
    assert found == "base_model.model.model.layers.0"
    assert not half.model.layers[0]._forward_hooks  # its watchers are removed


@pytest.mark.parametrize("scale", [0, 3, -4, 2.0, True])
def test_a_scale_that_is_not_a_power_of_two_is_refused(scale):
    with pytest.raises(ConfigError, match=r"--model.float16_residual_scale .*: use a power of two"):
        check_residual_scale(scale)
    with pytest.raises(ConfigError, match=r"--model.float16_residual_scale"):
        scale_residual_stream(_tiny_qwen2(), scale)


def test_scale_one_is_off():
    model = _tiny_qwen2()
    scaling = scale_residual_stream(model, 1)
    assert scaling.hooks == 0 and scaling.manifest() == residual_scaling_manifest(1, 0)
    assert model.model.norm.variance_epsilon == model.config.rms_norm_eps


def test_models_where_scaling_is_not_exact_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    with pytest.raises(ConfigError, match=r"--model.float16_residual_scale 32 .*a bias on self_attn.o_proj in 2 "
                                          r"of 2 layers.*--model.float16_residual_scale 1 \(off\)"):
        scale_residual_stream(LlamaForCausalLM(LlamaConfig(attention_bias=True, **llama)), 32)
    with pytest.raises(ConfigError, match=r"a bias on mlp.down_proj"):
        scale_residual_stream(LlamaForCausalLM(LlamaConfig(mlp_bias=True, **llama)), 32)
    with pytest.raises(ConfigError, match=r"no decoder with embed_tokens, layers and norm"):
        scale_residual_stream(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)), 32)
    assert scale_residual_stream(LlamaForCausalLM(LlamaConfig(**llama)), 32).hooks == 5
