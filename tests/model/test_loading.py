"""LoRA wrapping: what is trained, and bad layer names caught before training."""

from __future__ import annotations

import pytest

from codetune.errors import ConfigError
from codetune.model.loading import apply_lora
from codetune.model.tiny import build_tiny_model, train_tokenizer


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
