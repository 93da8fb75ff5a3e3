"""The base model of a finished run as an export finds it, downloading nothing: its config.json and weights from
its directory ('tiny': the run's base_model/) or, for a hub id, from the Hugging Face cache at the commit the run
trained on; and its name in Ollama's library, for the code bases codetune knows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from codetune.run.finished import RunConfig


def base_config(config: RunConfig) -> dict[str, Any]:
    """The base's config.json: from its directory ('tiny': the run's base_model/), or, for a hub id, from the
    Hugging Face cache at the commit the run trained on (an export downloads nothing)."""
    directory = Path(config.base_source).expanduser()
    path = directory / "config.json"
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        from codetune.run.finished import pinned

        commit = pinned(config).get("revision")
        cached = try_to_load_from_cache(config.name_or_path, "config.json", revision=commit)
        if not isinstance(cached, str):
            raise ConfigError(f"the base {config.name_or_path!r} of {config.run_dir} has no config.json in the Hugging "
                              f"Face cache{f' at {commit}' if commit else ''} (export downloads nothing): fetch it "
                              f"with `hf download {config.name_or_path} config.json"
                              f"{f' --revision {commit}' if commit else ''}`.")
        path = Path(cached)
    if not path.is_file():
        raise ConfigError(f"the base {config.name_or_path!r} of {config.run_dir}: {path} is missing; restore the base "
                          f"as the run trained on it.")
    return json.loads(path.read_text(encoding="utf-8"))


def base_weights(config: RunConfig) -> Callable[[str], torch.Tensor]:
    """A reader of the base's weights by name, from its directory or the Hugging Face cache (no download)."""
    from safetensors import safe_open

    def file_of(name: str) -> Path | None:
        local = Path(config.base_source).expanduser()
        if local.is_dir():
            return local / name if (local / name).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        from codetune.run.finished import pinned

        cached = try_to_load_from_cache(config.name_or_path, name, revision=pinned(config).get("revision"))
        return Path(cached) if isinstance(cached, str) else None

    def read(weight: str) -> torch.Tensor:
        index = file_of("model.safetensors.index.json")
        shard = json.loads(index.read_text())["weight_map"].get(weight) if index else "model.safetensors"
        path = file_of(shard) if shard else None
        if path is None:
            raise ConfigError(f"the base {config.name_or_path!r} has no {weight} at hand ({shard or 'no shard'} is "
                              f"neither in its directory nor in the Hugging Face cache): export turns the layers "
                              f"trained in full into LoRA pairs against the base's own, so it needs the base's "
                              f"weights. Download them once, or train with --model.modules_to_save '[]'.")
        with safe_open(str(path), framework="pt") as weights:
            return weights.get_tensor(weight).float()

    return read


def _ollama_library() -> dict[str, str]:
    """Hugging Face id (lower case) -> Ollama library name, for the code bases codetune knows."""
    names = {}
    for size in ("0.5", "1.5", "3", "7", "14", "32"):
        names[f"qwen/qwen2.5-coder-{size}b"] = f"qwen2.5-coder:{size}b-base"
        names[f"qwen/qwen2.5-coder-{size}b-instruct"] = f"qwen2.5-coder:{size}b-instruct"
    for size in ("3", "7", "15"):
        names[f"bigcode/starcoder2-{size}b"] = f"starcoder2:{size}b"
    for size in ("1.3", "6.7", "33"):
        names[f"deepseek-ai/deepseek-coder-{size}b-base"] = f"deepseek-coder:{size}b-base"
    for size in ("7", "13", "34"):
        names[f"codellama/codellama-{size}b-hf"] = f"codellama:{size}b-code"
    return names


OLLAMA_LIBRARY = _ollama_library()
