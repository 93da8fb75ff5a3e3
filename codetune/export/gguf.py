"""`--to gguf`: `adapter.gguf`, a GGUF LoRA adapter that llama.cpp loads beside a GGUF of the base
(`llama-server -m base.gguf --lora adapter.gguf`), written with the `gguf` package, the format's own Python library:

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
* Layers trained in full (`--model.modules_to_save`) become exact full-rank pairs: the trained weight minus the
  base's (`full_rank_pair`).

An adapter llama.cpp cannot take is refused, every problem at once, saying what to train instead: a LoRA on an
`lm_head` that the base ties to its embeddings (its GGUF has no separate output tensor), layers trained in full on
such a base or that are not matrices gguf's name map knows, DoRA, an adapter bias, and a base architecture outside
`GGUF_ARCHITECTURES` or a layer gguf's name map does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.errors import ConfigError
from codetune.export.adapter import Adapter, adapter_problems, refuse
from codetune.export.base import OLLAMA_LIBRARY, base_config, base_weights
from codetune.export.record import Exported

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import TensorNameMap

    from codetune.run.finished import RunConfig

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "adapter.gguf"
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

# One pair as llama.cpp takes it: (module in the base, llama.cpp's tensor name, A, B).
_Pair = tuple[str, str, "torch.Tensor", "torch.Tensor"]


@dataclass(frozen=True)
class GgufAdapter:
    """What goes into adapter.gguf: the architecture, alpha, and the tensors in llama.cpp's names and order."""

    architecture: str
    """llama.cpp's name, e.g. qwen2"""
    alpha: float
    tensors: tuple[tuple[str, np.ndarray], ...]


def gguf_adapter(adapter: Adapter, base: dict[str, Any], base_weight: Callable[[str], torch.Tensor],
                 target: str = "gguf") -> GgufAdapter:
    """The adapter's tensors in llama.cpp's names and orientation; ConfigError naming `--to target` for anything
    llama.cpp cannot load (every problem at once). `base_weight(name)` reads a base weight, for layers trained in
    full."""
    import gguf

    problems = adapter_problems(adapter, "llama.cpp")
    arch_name, permutes_qk = _gguf_architecture(base, problems, target)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, int(base["num_hidden_layers"]))
    tied = bool(base.get("tie_word_embeddings", False))
    pairs, unmapped = _lora_pairs(adapter, names, tied, problems)
    pairs += _full_layer_pairs(adapter, names, tied, base_weight, problems)
    if unmapped:
        problems.append(f"gguf's tensor names for {arch_name.lower()} have none for {unmapped[0]}"
                        f"{f' (and {len(unmapped) - 1} more)' if len(unmapped) > 1 else ''}: train without that "
                        f"layer in --model.lora_target_modules")
    refuse(problems, target)
    return GgufAdapter(gguf.MODEL_ARCH_NAMES[arch], adapter.alpha, _llama_cpp_tensors(pairs, base, permutes_qk))


def _gguf_architecture(base: dict[str, Any], problems: list[str], target: str) -> tuple[str, bool]:
    """The base's llama.cpp architecture and whether its q/k rows are reordered; refuses (with `problems` so far) a
    base architecture codetune does not export."""
    architecture = (base.get("architectures") or ["(none in config.json)"])[0]
    if architecture not in GGUF_ARCHITECTURES:
        problems.append(f"the base's architecture {architecture} is not one codetune exports to GGUF (it knows "
                        f"{', '.join(GGUF_ARCHITECTURES)}): use --to vllm, or `codetune merge` the run and convert "
                        f"the merged model with llama.cpp's convert_hf_to_gguf.py")
        refuse(problems, target)
    return GGUF_ARCHITECTURES[architecture]


def _lora_pairs(adapter: Adapter, names: TensorNameMap, tied: bool,
                problems: list[str]) -> tuple[list[_Pair], list[str]]:
    """The adapter's LoRA pairs under llama.cpp's names, and the modules gguf's name map has no name for; a LoRA on a
    tied lm_head is added to `problems`."""
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
    return pairs, unmapped


def _full_layer_pairs(adapter: Adapter, names: TensorNameMap, tied: bool,
                      base_weight: Callable[[str], torch.Tensor], problems: list[str]) -> list[_Pair]:
    """The layers trained in full as exact pairs (`full_rank_pair`); those llama.cpp cannot carry go to `problems`."""
    if adapter.full and tied:
        problems.append(f"the adapter trains {adapter.full_modules} in full (--model.modules_to_save) on a base that "
                        f"ties lm_head to embed_tokens (tie_word_embeddings), and its GGUF holds one matrix for both: "
                        f"train with --model.modules_to_save '[]' (LoRA only)")
        return []
    pairs = []
    for weight, trained in adapter.full.items():
        name = names.get_name(weight, try_suffixes=(".weight",))
        if name is None or trained.dim() != 2:
            problems.append(f"the adapter trains {weight} in full (--model.modules_to_save), which llama.cpp's "
                            f"adapters cannot carry (only matrices of layers gguf's name map knows): train "
                            f"without it in --model.modules_to_save")
            continue
        pairs.append((weight.removesuffix(".weight"), name, *full_rank_pair(trained - base_weight(weight), name,
                                                                            adapter.alpha)))
    return pairs


def _llama_cpp_tensors(pairs: list[_Pair], base: dict[str, Any],
                       permutes_qk: bool) -> tuple[tuple[str, np.ndarray], ...]:
    """Each pair's `.lora_a` and `.lora_b` arrays, q/k B rows in GGML's rotary order where the converter reorders."""
    tensors = []
    for module, name, a, b in pairs:
        if permutes_qk and module.endswith(("q_proj", "k_proj")):
            heads = base["num_attention_heads"] if module.endswith("q_proj") else \
                base.get("num_key_value_heads") or base["num_attention_heads"]
            b = rotary_rows_to_ggml(b, int(heads))
        tensors += [(f"{name}.lora_a", a.contiguous().numpy()), (f"{name}.lora_b", b.contiguous().numpy())]
    return tuple(tensors)


def full_rank_pair(delta: torch.Tensor, name: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer trained in full as an exact LoRA pair of llama.cpp (A, B as written): its change `delta` from the
    base, and an identity scaled so that llama.cpp's `alpha / rank` (rank read per pair, from B) cancels.

    A Linear's pair adds `alpha/in * delta @ (in/alpha * I) x = delta x`. The token embedding's pair is
    flipped, as llama.cpp applies it (`B @ A[token]`): A holds the rows of `delta`, B the identity."""
    import torch

    rank = delta.shape[1]  # in_features of a Linear, the hidden size of the embedding
    identity = torch.eye(rank) * (rank / alpha)
    return (delta, identity) if name == "token_embd.weight" else (identity, delta)


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


def write_adapter_gguf(config: RunConfig, adapter: Adapter, tmp: Path, outtype: str, target: str) -> Exported:
    """adapter.gguf in `tmp`, for `--to target` (gguf or ollama): the manifest's facts about it and the lines that
    tell its tensor types."""
    content = gguf_adapter(adapter, base_config(config), base_weights(config), target)
    counts = write_gguf(tmp / GGUF_FILE, content, outtype, name=config.run_dir.resolve().name)
    details = {"architecture": content.architecture, "outtype": outtype, "tensor_types": counts,
               "lora_pairs": len(content.tensors) // 2, "full_layers_as_pairs": adapter.full_modules}
    steps = [f"tensor types: {type_summary(counts, outtype, adapter.rank)}"]
    if adapter.full:
        steps.append(f"{', '.join(adapter.full_modules)} (trained in full) written as exact full-rank pairs: the "
                     f"trained weight minus the base's")
    return Exported(details, steps)


def export_gguf(config: RunConfig, adapter: Adapter, tmp: Path, out: Path, outtype: str) -> Exported:
    """`--to gguf`: adapter.gguf in `tmp` (to become `out`), and the llama-server line that loads it."""
    written = write_adapter_gguf(config, adapter, tmp, outtype, "gguf")
    serve = f"llama-server -m BASE.gguf --lora {(out / GGUF_FILE).resolve()}   ({base_gguf_hint(config)})"
    return Exported(written.details, [*written.next_steps, serve])


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
