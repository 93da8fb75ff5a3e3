"""`--to vllm`: a copy of the peft adapter (`adapter_config.json`, `adapter_model.safetensors`), made after checking
what vLLM refuses (`modules_to_save`, DoRA, a bias, a rank above 512), and the `vllm serve` line, with
`--max-lora-rank` the smallest of vLLM's allowed values (`VLLM_MAX_LORA_RANKS`) that holds the rank, and the
base's recorded commit as `--revision` for a hub base.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from codetune.errors import ConfigError
from codetune.export.adapter import Adapter, adapter_problems, refuse
from codetune.export.ollama import ollama_model_name
from codetune.export.record import Exported

if TYPE_CHECKING:
    from codetune.run.finished import RunConfig

# vLLM's LoRAConfig.max_lora_rank takes one of these (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_problems(adapter: Adapter) -> list[str]:
    problems = adapter_problems(adapter, "vLLM")
    if adapter.full_modules or adapter.config.get("modules_to_save"):
        problems.insert(0, f"the adapter trains {adapter.full_modules} in full (--model.modules_to_save), and vLLM "
                           f"loads only LoRA pairs (it refuses modules_to_save): train with --model.modules_to_save "
                           f"'[]' (LoRA only), or serve the merged model instead: `codetune merge RUN --out DIR`, "
                           f"then `vllm serve DIR`")
    return problems


def vllm_max_lora_rank(adapter: Adapter) -> int:
    """The `--max-lora-rank` vLLM needs for `adapter`: the smallest allowed value that holds its rank."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if adapter.rank <= allowed:
            return allowed
    raise ConfigError(f"--to vllm: the adapter's rank {adapter.rank} is above vLLM's largest --max-lora-rank "
                      f"({VLLM_MAX_LORA_RANKS[-1]}): train with --model.lora_rank {VLLM_MAX_LORA_RANKS[-1]} or less.")


def vllm_serve_command(config: RunConfig, out: Path, rank: int) -> str:
    from codetune.run.finished import pinned

    base = str(Path(config.base_source).resolve()) if Path(config.base_source).is_dir() else config.name_or_path
    revision = pinned(config).get("revision")
    return (f"vllm serve {base}{f' --revision {revision}' if revision else ''} --enable-lora --lora-modules "
            f"{ollama_model_name(config.run_dir)}={out.resolve()} --max-lora-rank {rank}")


def export_vllm(config: RunConfig, adapter: Adapter, tmp: Path, out: Path) -> Exported:
    """`--to vllm`: the checked adapter copied to `tmp` (to become `out`), and the vllm serve line."""
    from codetune.run.finished import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    refuse(vllm_problems(adapter), "vllm")
    rank = vllm_max_lora_rank(adapter)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(config.adapter_dir / name, tmp / name)
    command = vllm_serve_command(config, out, rank)
    return Exported({"max_lora_rank": rank, "serve": command}, [command])
