"""The token cache: hits for unchanged texts, only changed texts encoded, never another tokenizer's ids; and the
tokenizers `load_tokenizer` refuses (no fast tokenizer, no EOS) with one error naming the flag."""

from __future__ import annotations

import numpy as np
import pytest

from codetune.data import tokens
from codetune.data.tokens import TokenCache, load_tokenizer, tokenize_cached, tokenize_texts
from codetune.errors import ConfigError
from codetune.data.tokenizer import train_tokenizer

TEXTS = ["fn main() {\n    println!(\"hi\");\n}\n", "def f(x):\n    return x * 2\n", "pub struct S { a: u32 }\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 10, vocab_size=320)


@pytest.fixture
def encoded(monkeypatch):
    """Records every text that really goes through the tokenizer."""
    seen: list[str] = []

    def recording(tokenizer, texts):
        seen.extend(texts)
        return tokenize_texts(tokenizer, texts)

    monkeypatch.setattr(tokens, "tokenize_texts", recording)
    return seen


def same_ids(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == np.int32 and np.array_equal(x, y) for x, y in zip(a, b))


def test_second_run_encodes_nothing_and_returns_the_same_ids(tokenizer, tmp_path, encoded):
    want = tokenize_texts(tokenizer, TEXTS)
    first, stats = tokenize_cached(tokenizer, TEXTS, tmp_path)
    assert (stats.hits, stats.misses) == (0, 3) and encoded == TEXTS
    encoded.clear()
    second, stats = tokenize_cached(tokenizer, TEXTS, tmp_path)
    assert (stats.hits, stats.misses) == (3, 0) and encoded == []
    assert same_ids(first, want) and same_ids(second, want)


def test_a_changed_text_is_the_only_one_encoded(tokenizer, tmp_path, encoded):
    tokenize_cached(tokenizer, TEXTS, tmp_path)
    encoded.clear()
    changed = [TEXTS[0], TEXTS[1].replace("2", "3"), TEXTS[2]]
    ids, stats = tokenize_cached(tokenizer, changed, tmp_path)
    assert encoded == [changed[1]] and (stats.hits, stats.misses) == (2, 1)
    assert same_ids(ids, tokenize_texts(tokenizer, changed))


def test_another_tokenizer_never_reads_these_ids(tokenizer, tmp_path, encoded):
    tokenize_cached(tokenizer, TEXTS, tmp_path)
    other = train_tokenizer(TEXTS * 10, vocab_size=288)
    encoded.clear()
    ids, stats = tokenize_cached(other, TEXTS, tmp_path)
    assert stats.misses == 3 and encoded == TEXTS
    assert same_ids(ids, tokenize_texts(other, TEXTS))
    assert TokenCache(tmp_path, other).directory != TokenCache(tmp_path, tokenizer).directory


def test_a_torn_entry_is_a_miss_and_is_rewritten(tokenizer, tmp_path, encoded):
    cache = TokenCache(tmp_path, tokenizer)
    tokenize_cached(tokenizer, TEXTS, tmp_path)
    path = cache.path(tokens.text_key(TEXTS[0]))
    path.write_bytes(path.read_bytes()[:-1])
    encoded.clear()
    ids, stats = tokenize_cached(tokenizer, TEXTS, tmp_path)
    assert encoded == [TEXTS[0]] and stats.misses == 1
    assert same_ids(ids, tokenize_texts(tokenizer, TEXTS))
    assert not list(cache.directory.rglob("*.tmp")), "no temporary file is left behind"


def test_no_cache_dir_encodes_everything(tokenizer, tmp_path, encoded):
    ids, stats = tokenize_cached(tokenizer, TEXTS, None)
    assert stats.directory is None and stats.misses == 3 and encoded == TEXTS
    assert same_ids(ids, tokenize_texts(tokenizer, TEXTS))


def test_a_tokenizer_without_a_fast_version_is_one_error_naming_the_flag(tmp_path):
    # ByT5 has only a Python ("slow") tokenizer, and it needs no vocabulary file: a real slow-only directory.
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "ByT5Tokenizer"}')
    with pytest.raises(ConfigError) as raised:
        load_tokenizer(str(tmp_path), [], flag="--data.tokenizer")
    assert str(raised.value).startswith(f"--data.tokenizer {str(tmp_path)!r} has no fast tokenizer")
    assert "tokenizer.json" in str(raised.value)


def test_a_tokenizer_without_eos_is_one_error_naming_the_flag(tokenizer, tmp_path):
    saved = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<|pad|>")
    saved.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.is_fast and loaded.eos_token_id is None  # only the EOS check can refuse it
    with pytest.raises(ConfigError) as raised:
        load_tokenizer(str(tmp_path), [])
    assert str(raised.value).startswith(f"--model.name_or_path {str(tmp_path)!r}: its tokenizer has no EOS token")
