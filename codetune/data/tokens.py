"""Tokenizers: which one a run uses, and turning file texts into token ids with every core."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from codetune.errors import ConfigError
from codetune.model.tiny import TINY_NAME, train_tokenizer


def load_tokenizer(name_or_path: str, training_texts: Sequence[str], trust_remote_code: bool = False,
                   tiny_vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path` (hub id or local dir), or a new one trained for `tiny`."""
    if name_or_path == TINY_NAME:
        return train_tokenizer(training_texts, vocab_size=tiny_vocab_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(
            f"--model.name_or_path {name_or_path!r}: no tokenizer could be loaded ({str(err).strip().rstrip('.')}). "
            f"Use a local model directory, a Hugging Face id that is cached or reachable (with HF_HUB_OFFLINE "
            f"unset), or 'tiny' for the offline default."
        ) from err
    if not tokenizer.is_fast:
        raise ConfigError(f"--model.name_or_path {name_or_path!r} has no fast tokenizer; codetune needs one "
                          f"(tokenizer.json) to tokenize repositories in parallel.")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--model.name_or_path {name_or_path!r}: its tokenizer has no EOS token, which "
                          f"codetune needs to separate files.")
    return tokenizer


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id; models without one pad with EOS (padding is never a target, see packing)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids per text, no special tokens; the Rust backend spreads the batch over all cores."""
    if not texts:
        return []
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
