"""`codetune export RUN --to gguf|ollama|vllm [--out DIR]`: a finished run's LoRA adapter, ready for llama.cpp,
Ollama or vLLM, with nothing to download or compile.

**gguf** writes `adapter.gguf`, a GGUF LoRA adapter that llama.cpp loads beside a GGUF of the base
(`llama-server -m base.gguf --lora adapter.gguf`), with the `gguf` package, the format's own Python library:

* metadata `general.architecture` (the base's llama.cpp architecture), `general.type = adapter`,
  `adapter.type = lora` and `adapter.lora.alpha` (float32, as llama.cpp reads it);
* per adapted Linear, `<base tensor>.lora_a` and `.lora_b`, named through gguf's own tensor name map
  (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q.weight.lora_a`). The arrays keep peft's layout,
  A `[rank, in]` and B `[out, rank]`: gguf writes dimensions innermost first, so llama.cpp reads
  `ne = [in, rank]` and `[rank, out]`, the orientation it checks against the base tensor.
* For the Llama architecture (Llama, Mistral, Code Llama, DeepSeek-Coder v1, and codetune's 'tiny'), llama.cpp's
  converter reorders the rows of every q_proj and k_proj weight, head by head, from Hugging Face's
  rotate-half layout to GGML's interleaved rotary pairs. An update `B @ A` to those weights must be reordered
  the same way, which means B's rows: row `2i` of a head is HF row `i`, row `2i+1` is HF row `i + head_dim/2`.
  Qwen2, Qwen3 and StarCoder2 keep Hugging Face's layout.
* llama.cpp scales each pair by `alpha / rank`, as peft does, so the weights are written as trained.
* `--outtype` f32 (the default, as in llama.cpp's own convert_lora_to_gguf.py), f16 or q8_0. f16 halves a file
  that is small anyway, but llama.cpp rounds `A @ x` to the adapter's type before multiplying by B, and where
  that passes float16's 65504 the logits become inf or NaN: measured on a tiny run whose MLP inputs reach 2.8e4
  (`bench/export_llama_cpp.py`: NaN in f16, peft's logits to 2e-3 in f32). Q8_0 quantizes rows in blocks of
  32 values: a tensor whose rows are not a multiple of 32 long (B, whose rows are `rank` long, for ranks under
  32) is written in f16, and the command says how many tensors went each way.

An adapter llama.cpp cannot take is refused, saying what to train instead: layers trained in full
(`--model.modules_to_save`: llama.cpp loads only LoRA pairs), a LoRA on an `lm_head` that the base ties to its
embeddings (its GGUF has no separate output tensor), DoRA, an adapter bias, and a base architecture outside
`GGUF_ARCHITECTURES` or a layer gguf's name map does not know.

**ollama** writes the same `adapter.gguf` and a `Modelfile`: `FROM` the base (its Ollama library name when
codetune knows it, e.g. Qwen/Qwen2.5-Coder-1.5B -> `qwen2.5-coder:1.5b-base`; else `--base`; a local base
directory, as 'tiny' runs have, is given as its path, which Ollama imports for the architectures it supports),
`ADAPTER ./adapter.gguf`, a `TEMPLATE` that sends the editor's prefix and suffix as the base family's
fill-in-the-middle request (the run trained on raw code, not chat), and one `PARAMETER stop` per end-of-text
and FIM sentinel of the base's tokenizer. It prints the `ollama create` and `ollama run` commands.

**vllm** copies the peft adapter (`adapter_config.json`, `adapter_model.safetensors`) after checking what vLLM
refuses (`modules_to_save`, DoRA, a bias, a rank above 512) and prints the `vllm serve` line, with
`--max-lora-rank` the smallest of vLLM's allowed values (`VLLM_MAX_LORA_RANKS`) that holds the rank, and the
base's recorded commit as `--revision` for a hub base.

Every export checks the adapter for NaN and inf first, writes `--out` (default `RUN/export/<target>`)
atomically, marks it with `codetune_export.json`, whose `output_files` lists the files it wrote (a later export
may replace them, whatever its target; a directory holding anything else, or not marked, is refused: see
`codetune.run.replaceable_output_dir`), and records itself in the run's MANIFEST.json under
`phase_7_export.exports`: format, directory, and each file's size and sha256 (an export to the same directory
replaces its entry).
`--help` and a bad flag answer before torch is imported: the functions that need it import it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.errors import ConfigError
from codetune.storage import EXPORT_MARKER, atomic_save_dir, replaceable_output_dir, utc_now, write_output_marker
from codetune.run.manifest import Manifest
from codetune.run.directory import relative_to_run

if TYPE_CHECKING:
    import numpy as np
    import torch

    from codetune.data.fim import FimTokens
    from codetune.run.finished import RunConfig

TARGETS = ("gguf", "ollama", "vllm")
GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
EXPORT_PHASE = "phase_7_export"
# vLLM's LoRAConfig.max_lora_rank takes one of these (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# config.json `architectures[0]` -> (llama.cpp architecture, whether its converter reorders q/k rows for rotary
# embeddings), as llama.cpp's convert_hf_to_gguf.py registers them.
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "Starcoder2ForCausalLM": ("STARCODER2", False),
}
Q8_0_BLOCK = 32
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


# -- the adapter ---------------------------------------------------------------------------------------------


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


def vllm_problems(adapter: Adapter) -> list[str]:
    problems = adapter_problems(adapter, "vLLM")
    if adapter.full_modules or adapter.config.get("modules_to_save"):
        problems.insert(0, f"the adapter trains {adapter.full_modules} in full (--model.modules_to_save), and vLLM "
                           f"loads only LoRA pairs (it refuses modules_to_save): train with --model.modules_to_save "
                           f"'[]' (LoRA only), or serve the merged model instead: `codetune merge RUN --out DIR`, "
                           f"then `vllm serve DIR`")
    return problems


def refuse(problems: list[str], target: str) -> None:
    if problems:
        raise ConfigError(f"--to {target}: " + "; ".join(problems) + ".")


# -- GGUF ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufAdapter:
    """What goes into adapter.gguf: the architecture, alpha, and the tensors in llama.cpp's names and order."""

    architecture: str
    """llama.cpp's name, e.g. qwen2"""
    alpha: float
    tensors: tuple[tuple[str, np.ndarray], ...]


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


def gguf_adapter(adapter: Adapter, base: dict[str, Any], base_weight: Callable[[str], torch.Tensor],
                 target: str = "gguf") -> GgufAdapter:
    """The adapter's tensors in llama.cpp's names and orientation; ConfigError naming `--to target` for anything
    llama.cpp cannot load (every problem at once). `base_weight(name)` reads a base weight, for layers trained in
    full."""
    import gguf

    problems = adapter_problems(adapter, "llama.cpp")
    architecture = (base.get("architectures") or ["(none in config.json)"])[0]
    if architecture not in GGUF_ARCHITECTURES:
        problems.append(f"the base's architecture {architecture} is not one codetune exports to GGUF (it knows "
                        f"{', '.join(GGUF_ARCHITECTURES)}): use --to vllm, or `codetune merge` the run and convert "
                        f"the merged model with llama.cpp's convert_hf_to_gguf.py")
        refuse(problems, target)
    arch_name, permutes_qk = GGUF_ARCHITECTURES[architecture]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, int(base["num_hidden_layers"]))
    tied = bool(base.get("tie_word_embeddings", False))
    pairs, unmapped = [], []
    for layer in adapter.layers:
        name = names.get_name(f"{layer.module}.weight", try_suffixes=(".weight",))
        if name is None:
            unmapped.append(layer.module)
        elif name == "output.weight" and tied:
            problems.append(f"the adapter has a LoRA on {layer.module}, which this base ties to its token "
                            f"embeddings (tie_word_embeddings), so its GGUF has no output tensor to add it to: train "
                            f"without lm_head in --model.lora_target_modules")
        else:
            pairs.append((layer.module, name, layer.a, layer.b))
    if adapter.full and tied:
        problems.append(f"the adapter trains {adapter.full_modules} in full (--model.modules_to_save) on a base that "
                        f"ties lm_head to embed_tokens (tie_word_embeddings), and its GGUF holds one matrix for both: "
                        f"train with --model.modules_to_save '[]' (LoRA only)")
    elif adapter.full:
        for weight, trained in adapter.full.items():
            name = names.get_name(weight, try_suffixes=(".weight",))
            if name is None or trained.dim() != 2:
                problems.append(f"the adapter trains {weight} in full (--model.modules_to_save), which llama.cpp's "
                                f"adapters cannot carry (only matrices of layers gguf's name map knows): train "
                                f"without it in --model.modules_to_save")
                continue
            pairs.append((weight.removesuffix(".weight"), name, *full_rank_pair(trained - base_weight(weight),
                                                                                  name, adapter.alpha)))
    if unmapped:
        problems.append(f"gguf's tensor names for {arch_name.lower()} have none for {unmapped[0]}"
                        f"{f' (and {len(unmapped) - 1} more)' if len(unmapped) > 1 else ''}: train without that "
                        f"layer in --model.lora_target_modules")
    refuse(problems, target)
    tensors = []
    for module, name, a, b in pairs:
        if permutes_qk and module.endswith(("q_proj", "k_proj")):
            heads = base["num_attention_heads"] if module.endswith("q_proj") else \
                base.get("num_key_value_heads") or base["num_attention_heads"]
            b = rotary_rows_to_ggml(b, int(heads))
        tensors += [(f"{name}.lora_a", a.contiguous().numpy()), (f"{name}.lora_b", b.contiguous().numpy())]
    return GgufAdapter(gguf.MODEL_ARCH_NAMES[arch], adapter.alpha, tuple(tensors))


def full_rank_pair(delta: torch.Tensor, name: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer trained in full as an exact LoRA pair of llama.cpp (A, B as written): its change `delta` from the
    base, and an identity scaled so that llama.cpp's `alpha / rank` (rank read per pair, from B) cancels.

    A Linear's pair adds `alpha/in * delta @ (in/alpha * I) x = delta x`. The token embedding's pair is
    flipped, as llama.cpp applies it (`B @ A[token]`): A holds the rows of `delta`, B the identity."""
    import torch

    rank = delta.shape[1]  # in_features of a Linear, the hidden size of the embedding
    identity = torch.eye(rank) * (rank / alpha)
    return (delta, identity) if name == "token_embd.weight" else (identity, delta)


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


def rotary_rows_to_ggml(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (or of its LoRA B) as llama.cpp's converter reorders the
    weight: per head, from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(path: Path, content: GgufAdapter, outtype: str, name: str) -> dict[str, int]:
    """Write `content` as a GGUF adapter file; returns how many tensors were written in each type."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), content.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, content.alpha)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    counts: dict[str, int] = {}
    for tensor_name, data in content.tensors:
        if outtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            kind = "q8_0"
        else:
            kind = "f32" if outtype == "f32" else "f16"
            cast = data.astype(np.float32 if kind == "f32" else np.float16)
            if not np.isfinite(cast).all():
                raise ConfigError(f"--outtype {outtype}: {tensor_name} holds values beyond float16's range "
                                  f"(65504); nothing was written. Use --outtype f32.")
            writer.add_tensor(tensor_name, cast)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def type_summary(counts: dict[str, int], outtype: str, rank: int) -> str:
    """e.g. 'q8_0: 14 tensors; f16: 14 (rows of rank 8 values, not a multiple of Q8_0's block of 32)'."""
    parts = [f"{kind}: {n} tensor{'s' * (n != 1)}" for kind, n in counts.items()]
    if outtype == "q8_0" and "f16" in counts:
        parts[-1] += f" (LoRA B rows are rank {rank} values long, not a multiple of Q8_0's block of {Q8_0_BLOCK})"
    return "; ".join(parts)


# -- Ollama ---------------------------------------------------------------------------------------------


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


def ollama_base(config: RunConfig, given: str | None) -> str:
    """What the Modelfile's FROM names: `--base` (a path that exists, made absolute, or an Ollama model name),
    else the base's local directory ('tiny': the run's base_model/), else its Ollama library name."""
    if given:
        path = Path(given).expanduser()
        if path.exists():
            return str(path.resolve())
        if given.startswith((".", "/", "~")) or given.endswith(".gguf"):
            raise ConfigError(f"--base {given!r} does not exist. Give the Ollama name of the base (e.g. "
                              f"qwen2.5-coder:1.5b-base) or the path of a GGUF file or model directory of it.")
        return given
    local = Path(config.base_source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    known = OLLAMA_LIBRARY.get(config.name_or_path.lower())
    if known is None:
        raise ConfigError(f"--base: codetune does not know the Ollama library name of {config.name_or_path!r}. Give "
                          f"it (e.g. --base qwen2.5-coder:1.5b-base, see ollama.com/library), or the path of a GGUF "
                          f"file of the base (llama.cpp's convert_hf_to_gguf.py writes one).")
    return known


def modelfile(base: str, eos: str | None, fim: FimTokens | None, source: str) -> str:
    """The Modelfile text: FROM, ADAPTER, a FIM TEMPLATE when the base has plain-text sentinels, and stops."""
    lines = [f"# Written by codetune export from {source}.", f"FROM {base}", f"ADAPTER ./{GGUF_FILE}"]
    stops = [eos] if eos else []
    if fim is not None:
        sentinels = [fim.prefix_text, fim.suffix_text, fim.middle_text, *([fim.file_sep_text] if fim.file_sep_text
                                                                          else [])]
        if not any("▁" in s for s in sentinels):  # SentencePiece sentinels (Code Llama) have no plain-text form
            request = fim.psm_prompt("{{ .Prompt }}", "{{ .Suffix }}")
            lines.append(f'TEMPLATE """{{{{- if .Suffix }}}}{request}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"""')
            stops += sentinels
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def ollama_model_name(run_dir: Path) -> str:
    """A name `ollama create` takes: lower case letters, digits, '.', '_' and '-'."""
    return "codetune-" + (re.sub(r"[^a-z0-9._-]+", "-", run_dir.resolve().name.lower()).strip("-._") or "run")


# -- vLLM -----------------------------------------------------------------------------------------------


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


# -- the command ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What an export wrote and what to tell the user."""

    details: dict[str, Any]
    """Target-specific facts for the manifest (tensor types, the serve command...)."""
    next_steps: list[str]


def export_run(config: RunConfig, target: str, out: Path, outtype: str = "f32", base: str | None = None) -> Exported:
    """Export `config`'s run to `out` (atomically) and record it in the run's manifest."""
    from codetune.run.finished import check_adapter_finite, check_base

    started, start = utc_now(), time.perf_counter()
    check_adapter_finite(config.adapter_dir)
    check_base(config)
    adapter = read_adapter(config.adapter_dir)
    with atomic_save_dir(out) as tmp:
        exported = _write(config, adapter, target, tmp, out, outtype, base)
        files = file_records(tmp)
        write_output_marker(tmp, EXPORT_MARKER, {"source_run": str(config.run_dir.resolve()), "format": target,
                                                 "base_model": config.name_or_path, "exported_at": utc_now(),
                                                 "files": files})
    # Relative to the run when inside it (the default, RUN/export/<to>): the run can move with its exports.
    record_export(config.run_dir, {"format": target, "out": relative_to_run(out, config.run_dir),
                                   "started_at": started, "wall_s": round(time.perf_counter() - start, 3),
                                   "files": files, **exported.details})
    return exported


def _write(config: RunConfig, adapter: Adapter, target: str, tmp: Path, out: Path, outtype: str,
           base: str | None) -> Exported:
    from codetune.run.finished import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_tuned_tokenizer

    if target == "vllm":
        refuse(vllm_problems(adapter), target)
        rank = vllm_max_lora_rank(adapter)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(config.adapter_dir / name, tmp / name)
        command = vllm_serve_command(config, out, rank)
        return Exported({"max_lora_rank": rank, "serve": command}, [command])
    from_base = ollama_base(config, base) if target == "ollama" else None
    content = gguf_adapter(adapter, base_config(config), base_weights(config), target)
    counts = write_gguf(tmp / GGUF_FILE, content, outtype, name=config.run_dir.resolve().name)
    details = {"architecture": content.architecture, "outtype": outtype, "tensor_types": counts,
               "lora_pairs": len(content.tensors) // 2, "full_layers_as_pairs": adapter.full_modules}
    steps = [f"tensor types: {type_summary(counts, outtype, adapter.rank)}"]
    if adapter.full:
        steps.append(f"{', '.join(adapter.full_modules)} (trained in full) written as exact full-rank pairs: the "
                     f"trained weight minus the base's")
    if target == "gguf":
        steps.append(f"llama-server -m BASE.gguf --lora {(out / GGUF_FILE).resolve()}   ({base_gguf_hint(config)})")
        return Exported(details, steps)
    from codetune.data.fim import find_fim_tokens

    tokenizer = load_tuned_tokenizer(config)
    text = modelfile(from_base, tokenizer.eos_token, find_fim_tokens(tokenizer), str(config.run_dir.resolve()))
    (tmp / MODELFILE).write_text(text, encoding="utf-8")
    name = ollama_model_name(config.run_dir)
    create, run = f"ollama create {name} -f {(out / MODELFILE).resolve()}", f"ollama run {name} 'fn main() {{'"
    return Exported({**details, "from": from_base, "ollama_create": create, "ollama_run": run}, [*steps, create, run])


def base_gguf_hint(config: RunConfig) -> str:
    """Where BASE.gguf, the base in GGUF, comes from."""
    local = Path(config.base_source).expanduser()
    if local.is_dir():
        return (f"BASE.gguf: `python convert_hf_to_gguf.py {local.resolve()} --outfile BASE.gguf` in a llama.cpp "
                f"checkout")
    known = OLLAMA_LIBRARY.get(config.name_or_path.lower())
    return (f"BASE.gguf: a GGUF of {config.name_or_path}, e.g. from its GGUF repository on the Hugging Face hub, "
            f"`ollama pull {known}`, or llama.cpp's convert_hf_to_gguf.py" if known else
            f"BASE.gguf: a GGUF of {config.name_or_path}, e.g. from llama.cpp's convert_hf_to_gguf.py")


def file_records(directory: Path) -> list[dict[str, Any]]:
    """Each file under `directory`: its path there, size and sha256."""
    records = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        records.append({"file": path.relative_to(directory).as_posix(), "bytes": path.stat().st_size,
                        "sha256": digest.hexdigest()})
    return records


def record_export(run_dir: Path, entry: dict[str, Any]) -> None:
    """Add `entry` to the manifest's phase_7_export.exports, replacing an earlier export to the same directory."""
    manifest = Manifest(run_dir)
    earlier = [e for e in manifest.phases.get(EXPORT_PHASE, {}).get("exports", []) if e.get("out") != entry["out"]]
    manifest.phases[EXPORT_PHASE] = {"status": "completed", "started_at": entry["started_at"],
                                     "wall_s": entry["wall_s"], "exports": [*earlier, entry]}
    manifest.write()


EXAMPLES = """\
examples:
  codetune export runs/r --to ollama          # adapter.gguf + Modelfile in runs/r/export/ollama
  codetune export runs/r --to gguf --outtype q8_0 --out ~/models/r-lora
  codetune export runs/r --to vllm
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune export", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a finished run's LoRA adapter for llama.cpp (--to gguf), Ollama (--to ollama: the GGUF\n"
                    "adapter and a Modelfile) or vLLM (--to vllm: the checked peft adapter), and print the commands\n"
                    "that serve it. Nothing is downloaded or compiled.")
    parser.add_argument("run", help="The run directory (runs/<name>, the last line `codetune fit` prints).")
    parser.add_argument("--to", required=True, choices=TARGETS, help="What to export for.")
    parser.add_argument("--out", default=None,
                        help="Directory to write (new, empty, or an earlier export); default RUN/export/<target>.")
    parser.add_argument("--outtype", default=None, choices=GGUF_TYPES,
                        help="Type of the GGUF tensors, with --to gguf or ollama (default f32, as llama.cpp's "
                             "converter; f16 can overflow in llama.cpp on large activations). q8_0 keeps f16 for "
                             "tensors whose rows are not a multiple of 32 values.")
    parser.add_argument("--base", default=None,
                        help="With --to ollama: what the Modelfile's FROM names, an Ollama model (e.g. "
                             "qwen2.5-coder:1.5b-base) or the path of a GGUF of the base. Default: the base's Ollama "
                             "library name when codetune knows it, or its local directory.")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    # Only now: the run's code imports torch (seconds), which `--help` and a bad flag need not wait for.
    from codetune.run.finished import load_run_config

    if args.outtype is not None and args.to == "vllm":
        raise ConfigError("--outtype is for --to gguf or ollama; --to vllm copies the adapter as trained.")
    if args.base is not None and args.to != "ollama":
        raise ConfigError("--base is for --to ollama (the Modelfile's FROM); llama.cpp and vLLM take the base on "
                          "their own command line, printed at the end.")
    config = load_run_config(args.run)
    out = replaceable_output_dir(args.out or str(config.run_dir / "export" / args.to), EXPORT_MARKER,
                                 "codetune export")
    exported = export_run(config, args.to, out, args.outtype or "f32", args.base)
    print(f"codetune export: {config.run_dir} for {args.to} in {out}", file=sys.stderr, flush=True)
    for line in exported.next_steps:
        print(f"  {line}", file=sys.stderr, flush=True)
    print(out, flush=True)
    return 0
