"""Loading the base model (hub id, local dir or the embedded tiny one), 4-bit NF4, and LoRA.

We deliberately do not call peft's `prepare_model_for_kbit_training`: it upcasts every
unquantized weight to fp32 (for a 1.5B model with a tied 151k-token embedding that is ~0.5 GB of
VRAM for nothing, since those weights are frozen). The parts of it we need — frozen base,
gradient checkpointing, inputs that require grad — are done explicitly below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

from codetune.errors import ConfigError

Quantization = Literal["auto", "nf4", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


def resolve_quantization(quantization: Quantization, cuda_available: bool) -> bool:
    """Whether to load in 4-bit. `auto` means NF4 on CUDA; elsewhere it warns once and loads unquantized."""
    if quantization == "nf4":
        return True
    if quantization == "none":
        return False
    if not cuda_available:
        rank_zero_warn("codetune: no CUDA device, so --model.quantization=auto loads the base model unquantized "
                       "(no 4-bit). Set --model.quantization=nf4 to force 4-bit anyway.")
    return cuda_available


def resolve_dtype(dtype: DType, cuda_available: bool) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it, fp32 otherwise (CPU bf16 matmuls are slow)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if cuda_available and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if cuda_available else torch.float32


def check_context(seq_len: int, config: PretrainedConfig) -> None:
    """A window must fit the model's context (`max_position_embeddings`), or positions past it are garbage."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"--data.seq_len={seq_len} is longer than the model's context ({context} tokens). "
                          f"Use --data.seq_len {context} or less.")


def load_causal_lm(name_or_path: str | Path, quantize: bool, dtype: torch.dtype, trust_remote_code: bool,
                   attn_implementation: str, device: torch.device) -> PreTrainedModel:
    """A causal LM from a hub id or local directory, in NF4 (double-quantized) when `quantize`."""
    quantization_config = None
    if quantize:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, quantization_config=quantization_config,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            # bitsandbytes quantizes while placing weights, so 4-bit loads straight onto the device.
            device_map={"": device} if quantize else None,
        )
    except OSError as err:
        raise ConfigError(f"--model.name_or_path {str(name_or_path)!r}: could not load the model "
                          f"({str(err).strip().rstrip('.')}). Use a local model directory, a Hugging Face id that is "
                          f"cached or reachable, or 'tiny'.") from err
    # from_pretrained returns eval mode, which silently disables dropout and gradient checkpointing.
    model.train()
    if quantize:
        keep_4bit_layout_trainable(model)
    return model


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking CPU 4-bit weights for inference.

    On a CPU with AVX512-BF16, a `Linear4bit` that runs in eval mode without grad (validation,
    generation samples) repacks its weight for a faster kernel and keeps that layout back in train
    mode, where that kernel has no backward: from then on no gradient flows through the frozen base
    and earlier LoRA layers get none (bitsandbytes 0.50.2; `tests/model/test_loading.py` shows it).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing: the reentrant one fails under DDP ("marked ready twice").
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def apply_lora(model: PreTrainedModel, rank: int, alpha: int, dropout: float, target_modules: list[str],
               modules_to_save: list[str] | None = None) -> PeftModel:
    """Wrap `model` in LoRA adapters; `modules_to_save` layers are trained in full (and saved with the adapter)."""
    _check_modules_to_save(model, modules_to_save or [])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--model.lora_target_modules={list(target_modules)}: none match this model. Linear "
                          f"layers it has: {names}.") from err


def _check_modules_to_save(model: PreTrainedModel, modules_to_save: list[str]) -> None:
    # peft ignores a modules_to_save name that matches nothing: the user would train less than asked.
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in modules_to_save if m not in names]
    if missing:
        top = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())} - {""})
        raise ConfigError(f"--model.modules_to_save={list(modules_to_save)}: {missing} match no layer of this model. "
                          f"Its layers are named: {top}.")
