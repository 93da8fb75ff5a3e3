"""Shared by test_isolation.py and test_learning_signal.py: eight small files packed into windows of 16 tokens, and
a tiny Llama with LoRA whose B is random (peft starts it at zero), so the adapters are on the path under test.

With one EOS each and cut every 16 tokens the files make [A] [B C] [D E F] [G..] [..G H padding]: rows of one, two
and three files, a file continued into the next window, and a padded last window. The rows hold 15, 14, 13, 15 and 8
targets, so micro-batches of 1 or 2 windows weigh differently than their target counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from codetune.model.loading import apply_lora

SEQ_LEN = 16
FILE_LENGTHS = (15, 8, 6, 4, 5, 4, 19, 5)
EOS, PAD = 95, 7  # the pad id is a real token id too: only n_real tells padding apart


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: torch's thread pool costs more than it saves, and many times more on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_files(seed: int) -> list[np.ndarray]:
    """The files' tokens, each with its EOS."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 90, n), EOS).astype(np.int64) for n in FILE_LENGTHS]


def stream_pieces(files: list[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """(row, column, tokens) of every piece of a file in a window, from the file lengths alone: the files follow
    each other in one stream cut every SEQ_LEN tokens (what packing must have done)."""
    pieces, at = [], 0
    for tokens in files:
        offset = 0
        while offset < len(tokens):
            row, column = divmod(at, SEQ_LEN)
            n = min(len(tokens) - offset, SEQ_LEN - column)
            pieces.append((row, column, tokens[offset:offset + n]))
            offset, at = offset + n, at + n
    return pieces


def tiny_lora_llama():
    """A 2-layer Llama (vocabulary 96) with LoRA on the attention projections and random B, in training mode, as
    training calls it (no dropout: LoRA's is 0, Llama's attention dropout too)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = apply_lora(LlamaForCausalLM(config), 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model.train()
