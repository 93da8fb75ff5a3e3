"""What `--to ollama` names and writes, without a trained run: the Modelfile's FROM, its text, the model name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codetune.data.fim import FimTokens
from codetune.errors import ConfigError
from codetune.export.ollama import modelfile, ollama_base, ollama_model_name
from codetune.run.finished import RunConfig


def test_ollama_base_names(tmp_path):
    def config(name: str) -> RunConfig:
        return RunConfig(run_dir=tmp_path, name_or_path=name, quantization="auto", dtype="auto",
                         trust_remote_code=False, attn_implementation="sdpa")

    assert ollama_base(config("Qwen/Qwen2.5-Coder-1.5B"), None) == "qwen2.5-coder:1.5b-base"
    assert ollama_base(config("Qwen/Qwen2.5-Coder-7B-Instruct"), None) == "qwen2.5-coder:7b-instruct"
    assert ollama_base(config("bigcode/starcoder2-3b"), None) == "starcoder2:3b"
    assert ollama_base(config("some/unknown-coder"), "my-coder:latest") == "my-coder:latest"
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    assert ollama_base(config("some/unknown-coder"), str(tmp_path / "base.gguf")) == str(tmp_path / "base.gguf")
    with pytest.raises(ConfigError, match=r"--base: codetune does not know the Ollama library name of "
                                          r"'some/unknown-coder'"):
        ollama_base(config("some/unknown-coder"), None)
    with pytest.raises(ConfigError, match=r"--base '\./missing.gguf' does not exist"):
        ollama_base(config("some/unknown-coder"), "./missing.gguf")


QWEN = FimTokens("qwen", 1, 2, 3, "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", 4, "<|file_sep|>")
CODE_LLAMA = FimTokens("codellama", 1, 2, 3, "▁<PRE>", "▁<SUF>", "▁<MID>")


def test_the_modelfile_sends_infill_requests_and_stops_at_every_sentinel():
    text = modelfile("qwen2.5-coder:1.5b-base", "<|endoftext|>", QWEN, "/runs/r")
    assert text.splitlines()[:4] == [
        "# Written by codetune export from /runs/r.", "FROM qwen2.5-coder:1.5b-base", "ADAPTER ./adapter.gguf",
        'TEMPLATE """{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>'
        '{{- else }}{{ .Prompt }}{{- end }}"""']
    stops = [json.loads(line.removeprefix("PARAMETER stop ")) for line in text.splitlines()[4:]]
    assert stops == ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"]
    assert text.endswith("\n")


def test_sentencepiece_sentinels_get_no_template_and_no_fim_tokens_get_only_eos():
    assert "TEMPLATE" not in modelfile("b", "</s>", CODE_LLAMA, "r")
    assert modelfile("b", "</s>", CODE_LLAMA, "r").splitlines()[3:] == ['PARAMETER stop "</s>"']
    assert modelfile("b", None, None, "r").splitlines()[1:] == ["FROM b", "ADAPTER ./adapter.gguf"]


def test_the_ollama_model_name_is_one_ollama_create_takes(tmp_path):
    assert ollama_model_name(tmp_path / "My Run (2)") == "codetune-my-run-2"
    assert ollama_model_name(tmp_path / "run_1.b") == "codetune-run_1.b"
    assert ollama_model_name(Path(tmp_path / "***")) == "codetune-run"
