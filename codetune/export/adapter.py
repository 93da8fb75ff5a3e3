"""A peft LoRA adapter as `save_pretrained` wrote it, read for export: its config, its LoRA pairs (fp32, on the
CPU), and the layers it trained in full (`--model.modules_to_save`); and what a reader (llama.cpp, vLLM) cannot
load in it whatever the base, each problem with what to train instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.errors import ConfigError

if TYPE_CHECKING:
    import torch

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted Linear of the adapter: its module name in the base and its two factors (fp32)."""

    module: str
    """e.g. model.layers.0.self_attn.q_proj"""
    a: torch.Tensor
    """[rank, in_features]"""
    b: torch.Tensor
    """[out_features, rank]"""


@dataclass(frozen=True)
class Adapter:
    """A peft LoRA adapter as saved: its config, its LoRA pairs, and the layers it trained in full."""

    config: dict[str, Any]
    layers: tuple[LoraLayer, ...]
    full: dict[str, torch.Tensor]
    """`modules_to_save` layers, trained in full: weight name in the base (model.embed_tokens.weight) -> weight."""

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def full_modules(self) -> list[str]:
        return sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in self.full})


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter in `adapter_dir` (peft's `save_pretrained` layout), every tensor in fp32 on the CPU."""
    from safetensors import safe_open

    from codetune.run.finished import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    full = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            match = _LORA_KEY.match(key)
            if match is not None:
                factors.setdefault(match["module"], {})[match["part"]] = weights.get_tensor(key).float()
            elif not key.endswith(".base_layer.weight"):
                # peft also saves the frozen base weight of a LoRA'd lm_head or embedding (`base_layer`), in case the
                # vocabulary was resized; codetune never resizes it, so that copy is the base's own and is skipped.
                full[key.removeprefix("base_model.model.")] = weights.get_tensor(key).float()
    broken = [module for module, parts in factors.items() if set(parts) != {"A", "B"}]
    if broken:
        raise ConfigError(f"{adapter_dir / ADAPTER_WEIGHTS}: {broken[0]} has only one of its two LoRA factors: "
                          f"the adapter is damaged. Train the run again.")
    layers = tuple(LoraLayer(module, parts["A"], parts["B"]) for module, parts in factors.items())
    return Adapter(config, layers, full)


def adapter_problems(adapter: Adapter, reader: str) -> list[str]:
    """What `reader` (llama.cpp or vLLM) cannot load in `adapter` whatever the base, each with what to do instead."""
    problems = []
    if adapter.config.get("use_dora"):
        problems.append(f"the adapter is DoRA (use_dora), which {reader} does not load: train a plain LoRA")
    if (adapter.config.get("bias") or "none") != "none":
        problems.append(f"the adapter trains biases (bias={adapter.config['bias']!r}), which {reader} does not load: "
                        f"train with bias 'none'")
    return problems


def refuse(problems: list[str], target: str) -> None:
    if problems:
        raise ConfigError(f"--to {target}: " + "; ".join(problems) + ".")
