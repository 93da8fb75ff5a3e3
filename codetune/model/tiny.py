"""The embedded default model: a tiny Llama built from a config with a fixed seed, offline.

`--model.name_or_path tiny` needs no download: the model is a randomly initialised Llama sized to the run's
tokenizer (`codetune.data.tokenizer`), saved with it into the run directory (`base_model/`), so the adapter
loads later with plain transformers + peft, exactly as for a hub model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where used: transformers' model classes take a second to import
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                max_position_embeddings: int = 4096, bos_token_id: int = 1, eos_token_id: int = 2,
                pad_token_id: int = 0) -> LlamaConfig:
    from transformers import LlamaConfig

    # Dimensions stay multiples of 32: bitsandbytes' 4-bit blocks and fused kernels expect it.
    for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if value % 32:
            raise ValueError(f"tiny model {name}={value} must be a multiple of 32")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def padded_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """The embedding rows for `tokenizer`, rounded up to a multiple of 32."""
    return rounded_vocab_size(len(tokenizer))


def rounded_vocab_size(entries: int) -> int:
    """The embedding rows for a vocabulary of `entries`: rounded up to a multiple of 32, as `tiny_config` needs."""
    return -(-entries // 32) * 32


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                     max_position_embeddings: int = 4096) -> LlamaForCausalLM:
    from transformers import LlamaForCausalLM

    config = tiny_config(
        padded_vocab_size(tokenizer),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private generator keeps the init independent of whatever consumed the global RNG before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
