"""Loading the base model (hub id, local dir or the embedded tiny one), 4-bit NF4, and LoRA.

We deliberately do not call peft's `prepare_model_for_kbit_training`: it upcasts every
unquantized weight to fp32 (for a 1.5B model with a tied 151k-token embedding that is ~0.5 GB of
VRAM for nothing, since those weights are frozen). The parts of it we need — frozen base,
gradient checkpointing, inputs that require grad — are done explicitly below.

peft, bitsandbytes and transformers' model classes are imported inside the functions that use them: importing
them costs about a second, which every command (`--help` included) would otherwise pay at start-up.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError

from codetune.errors import ConfigError
from codetune.data.model_source import bad_model_dir_message, check_model_source, local_model_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel

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


# bf16 runs natively from compute capability 8.0 (Ampere); below it (Turing: RTX 20xx, GTX 16xx) torch only
# emulates it, which `torch.cuda.is_bf16_supported()` counts as support by default.
NATIVE_BF16_CAPABILITY = (8, 0)
# The trainer precision each compute dtype trains under: 16-bit always under autocast (the LoRA weights stay fp32),
# float16 with a GradScaler (Lightning's 16-mixed); "bf16-true"/"16-true" would cast the fp32 LoRA weights too.
PRECISION_OF_DTYPE = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


def resolve_dtype(dtype: DType, device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """`auto`: on CUDA bf16 from compute capability 8.0 on and fp16 below it (no emulated bf16 on Turing);
    fp32 on CPU (CPU bf16 matmuls are slow). Any other value than a `DType` is a ConfigError."""
    if dtype not in get_args(DType):
        # A run's config.yaml reaches here unparsed (`codetune generate`): `getattr(torch, ...)` would take
        # "half" or "float64" silently and fail on "bf16" with an AttributeError.
        raise ConfigError(f"--model.dtype {dtype!r} (model.dtype in a run's config.yaml): use one of "
                          f"{', '.join(get_args(DType))}.")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16


def cuda_capability(device: torch.device | int | None = None) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (the current one for None), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def precision_for(dtype: torch.dtype) -> str:
    """The --trainer.precision that trains a base model computing in `dtype`."""
    return PRECISION_OF_DTYPE[dtype]


def check_precision(dtype: torch.dtype, dtype_flag: str, precision: str) -> None:
    """--model.dtype and --trainer.precision must describe one way of training, or the run stops before loading."""
    want = precision_for(dtype)
    if str(precision) == want or (want == "32-true" and str(precision) in ("32", "32-true")):
        return
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float16 and str(precision) == "bf16-mixed":
        raise ConfigError(f"--model.dtype {dtype_flag} computes in float16, which needs a CUDA device (Lightning "
                          f"trains 16-mixed as bf16-mixed on CPU). On CPU use --model.dtype bfloat16 or float32.")
    raise ConfigError(f"--model.dtype {dtype_flag} (here {name}) and --trainer.precision {precision} disagree: a "
                      f"{name} base trains with --trainer.precision {want} (LoRA weights in fp32"
                      f"{', under autocast' if want != '32-true' else ''}). Drop --trainer.precision (it follows "
                      f"--model.dtype) or give the matching pair.")


def check_context(seq_len: int, config: PretrainedConfig) -> None:
    """A window must fit the model's context (`max_position_embeddings`), or positions past it are garbage."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"--data.seq_len={seq_len} is longer than the model's context ({context} tokens). "
                          f"Use --data.seq_len {context} or less.")


def load_causal_lm(name_or_path: str | Path, quantize: bool, dtype: torch.dtype, trust_remote_code: bool,
                   attn_implementation: str, device: torch.device, revision: str | None = None) -> PreTrainedModel:
    """A causal LM from a hub id (at `revision`: a commit pins it) or local directory, in NF4 (double-quantized)
    when `quantize`. 'sdpa' attention runs codetune's, whose kernel is chosen per card (codetune/model/attention.py).
    A local directory that is not a complete model is one ConfigError naming what it lacks."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from codetune.model.attention import loaded_implementation

    check_model_source(str(name_or_path), "--model.name_or_path")
    directory = local_model_dir(name_or_path)
    quantization_config = None
    if quantize:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    try:
        with quiet_weight_bars():
            # The expanded directory: transformers takes an unexpanded '~/...' for a hub id.
            model = AutoModelForCausalLM.from_pretrained(
                str(directory or name_or_path), dtype=dtype, quantization_config=quantization_config,
                trust_remote_code=trust_remote_code, attn_implementation=loaded_implementation(attn_implementation),
                revision=revision,
                # bitsandbytes quantizes while placing weights, so 4-bit loads straight onto the device.
                device_map={"": device} if quantize else None,
            )
    except (OSError, SafetensorError) as err:  # no weights file or an unreadable one; a torn .safetensors
        raise ConfigError(_load_failure_message(name_or_path, directory, err)) from err
    # from_pretrained returns eval mode, which silently disables dropout and gradient checkpointing.
    model.train()
    if quantize:
        keep_4bit_layout_trainable(model)
    return model


def _load_failure_message(name_or_path: str | Path, directory: Path | None, err: Exception) -> str:
    reason = str(err).strip().rstrip(".")
    if directory is not None:
        return bad_model_dir_message("--model.name_or_path", directory, f"its weights could not be loaded ({reason})")
    return (f"--model.name_or_path {str(name_or_path)!r}: could not load the model ({reason}). Use a local model "
            f"directory, a Hugging Face id that is cached or reachable, or 'embedded' (offline).")


@contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Without transformers' per-tensor progress bars ("Loading weights", "Writing model shards"): they finish in
    a blink and read as noise. huggingface_hub's download bars stay as they were (a download takes minutes)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # turns the hub's off too
    if not hub_bars_off:
        enable_progress_bars()
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes logs this when it is imported (peft imports it whatever the quantization) on a CPU with AVX512-BF16
# and without the optional `kernels` package: a faster CPU 4-bit kernel is missing, nothing is wrong.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))


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
    # transformers 5 names it activation checkpointing (`gradient_checkpointing_enable` is its deprecated alias).
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def apply_lora(model: PreTrainedModel, rank: int, alpha: int, dropout: float, target_modules: list[str],
               modules_to_save: list[str] | None = None) -> PeftModel:
    """Wrap `model` in LoRA adapters; `modules_to_save` layers are trained in full (and saved with the adapter)."""
    from peft import LoraConfig, get_peft_model

    _check_modules_to_save(model, modules_to_save or [])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--model.lora_target_modules={list(target_modules)}: none match this model. Linear "
                          f"layers it has: {names}.") from err


def keep_adapter_input_dtype(model: torch.nn.Module) -> None:
    """Turn off peft's cast of each LoRA layer's input to the adapter's (fp32) dtype, for good (what
    `peft.helpers.disable_input_dtype_casting` does for a block): under autocast the adapter's matmuls run in the
    16-bit dtype anyway, and the cast's fp32 copy is what backward would keep. A checkpointed layer's recompute
    must see the same setting as its forward, so it is not scoped to the forward. Code that runs the model
    outside the trainer's autocast (generation) enters `trainer.precision_plugin.forward_context()`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def _check_modules_to_save(model: PreTrainedModel, modules_to_save: list[str]) -> None:
    # peft ignores a modules_to_save name that matches nothing: the user would train less than asked.
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in modules_to_save if m not in names]
    if missing:
        top = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())} - {""})
        raise ConfigError(f"--model.modules_to_save={list(modules_to_save)}: {missing} match no layer of this model. "
                          f"Its layers are named: {top}.")
