"""Loading and LoRA wrapping: 4-bit gradients, what is trained, bad layer names caught before training."""

from __future__ import annotations

import pytest
import torch

from codetune.errors import ConfigError
from codetune.model.loading import apply_lora, load_causal_lm, resolve_quantization
from codetune.data.tokenizer import train_tokenizer
from codetune.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 20], vocab_size=300)


def test_modules_to_save_are_trained_in_full(tokenizer):
    model = apply_lora(build_tiny_model(tokenizer), 8, 16, 0.0, ["q_proj"], ["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    # LoRA on q_proj in 2 layers: r x (in + out) each; plus a full trainable copy of lm_head.
    assert model.get_nb_trainable_parameters()[0] == 2 * 8 * (hidden + hidden) + vocab * hidden
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_unknown_names_are_one_clear_error(tokenizer):
    with pytest.raises(ConfigError, match=r"--model.modules_to_save=\['lm_hed'\]: \['lm_hed'\] match no layer.*lm_head"):
        apply_lora(build_tiny_model(tokenizer), 8, 16, 0.0, ["q_proj"], ["lm_hed"])
    with pytest.raises(ConfigError, match=r"--model.lora_target_modules=\['qproj'\]: none match.*q_proj"):
        apply_lora(build_tiny_model(tokenizer), 8, 16, 0.0, ["qproj"])


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _lora_model(model_dir, quantize: bool):
    """The saved tiny model (4-bit or fp32) with LoRA whose B is non-zero, so every factor gets a gradient."""
    model = load_causal_lm(model_dir, quantize, torch.float32, False, "sdpa", torch.device("cpu"))
    model = apply_lora(model, 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"])
    generator = torch.Generator().manual_seed(0)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model(tokenizer).save_pretrained(path)
    return path


def test_4bit_gradients_equal_those_of_the_dequantized_model(model_dir):
    """QLoRA on CPU computes the same LoRA gradients as fp32 LoRA on the dequantized weights, and still does
    after an eval pass without grad (which made bitsandbytes repack weights into a layout with no backward)."""
    import bitsandbytes as bnb

    ids = torch.randint(0, 290, (2, 32), generator=torch.Generator().manual_seed(1))
    quantized = _lora_model(model_dir, quantize=True)
    reference = _lora_model(model_dir, quantize=False)
    dequantized = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                   for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert dequantized, "the model was not loaded in 4-bit"
    modules = dict(reference.named_modules())
    for name, weight in dequantized.items():
        modules[name].weight.data = weight.float()
    want = _lora_grads(reference, ids)
    for attempt in ("before", "after"):
        got = _lora_grads(quantized, ids)
        assert set(got) == set(want) and all(g is not None for g in got.values()), attempt
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{attempt} eval: {name}")
        quantized.eval()
        with torch.no_grad():
            quantized(input_ids=ids[:, :4])
        quantized.train()


def test_auto_quantization_is_nf4_on_cuda_and_warns_once_elsewhere(recwarn):
    assert resolve_quantization("auto", cuda_available=True) is True
    assert resolve_quantization("nf4", cuda_available=False) is True
    assert resolve_quantization("none", cuda_available=True) is False
    assert not recwarn.list
    assert resolve_quantization("auto", cuda_available=False) is False
    assert [str(w.message) for w in recwarn.list if "quantization" in str(w.message)] == [
        "codetune: no CUDA device, so --model.quantization=auto loads the base model unquantized (no 4-bit). "
        "Set --model.quantization=nf4 to force 4-bit anyway."]
