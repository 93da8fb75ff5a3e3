"""A local model directory without tokenizer.json, from which transformers cannot build a tokenizer, is one
ConfigError naming the flag and the missing file (not transformers' multi-line ValueError)."""

from __future__ import annotations

import pytest

from codetune.data.tokens import load_tokenizer
from codetune.errors import ConfigError


def test_a_model_directory_without_a_tokenizer_names_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError) as raised:
        load_tokenizer(str(tmp_path), [])
    message = str(raised.value)
    assert message.startswith(f"--model.name_or_path {str(tmp_path)!r}: it has no tokenizer.json, and transformers "
                              f"could not build a tokenizer without it (")
    assert "\n" not in message and "Point --model.name_or_path at a complete model directory" in message
