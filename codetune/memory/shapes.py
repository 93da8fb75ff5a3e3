"""What the memory plan reads and what it answers: the model's and the training's shapes, and the plan itself.

`ModelShape` holds the sizes of a Llama/Qwen2-style decoder that decide its memory, `TrainingShape` how one
micro-batch is trained (the knobs of `CodeLoRAModule` and of the data that move memory; `training_shape_for` maps the
module's settings to it), and `MemoryPlan` the estimate of one training step term by term
(`codetune.memory.estimate` makes it), with what it needs free before or after the model is loaded. The choices
of `codetune.memory.search` (`CheckpointingChoice`, `MicroBatchChoice`) carry the plan they chose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from codetune.errors import ConfigError
from codetune.memory.checks import (lora_dropout_problems, lora_rank_problems, loss_chunk_problems,
                                    micro_batch_problems)
from codetune.memory.units import MiB

# The Linears inside one decoder layer, in the order a layer runs them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Layers that can be trained in full (peft's `modules_to_save`).
FULL_MODULES = ("embed_tokens", "lm_head")
# Linear layers that get adapters by default (every projection); `CodeLoRAModule` uses the same list.
DEFAULT_LORA_TARGETS = PROJECTIONS
# The caching allocator reserves more than it hands out: blocks are rounded up (512 B, 2 MiB segments for
# mid-sized tensors) and a cached segment split for a smaller tensor leaves a gap. Reserved memory is
# typically 5-15% above the allocated peak; a step here frees three ~0.6 GB loss buffers and then carves
# the last layer's re-run out of them, a pattern that fragments, so the midpoint, not the low end. That
# assumes expandable segments, as codetune sets them (codetune/memory/allocator.py): segments grow in place and
# freed memory serves requests of other sizes; with fixed segments the gaps of that pattern can exceed the margin.
ALLOCATOR_MARGIN = 0.10
# On the CPU the process's resident memory grows by more than the tensors the plan counts: the heap keeps freed
# blocks for reuse and CPU kernels (oneDNN, SDPA's backward) allocate scratch. Measured on tiny fits (fp32, sdpa,
# packed windows; peak RSS over the RSS at the first step): 2.3x the plan's to-allocate at 8 x 256 tokens, 2.06x at
# 4 x 1024, 1.75x at 4 x 2048, 1.56x at 2 x 4096 (about 1.4x + 70 MiB), so RAM is checked for twice the plan plus
# 256 MiB: uncertain, and the cost of a wrong "fits" is a machine swapping to a halt.
CPU_RSS_FACTOR = 2.0
CPU_RSS_OVERHEAD_BYTES = 256 * MiB
# Bytes of one value.
FP32 = 4
INT64 = 8

Quantization = Literal["nf4", "none"]
Optimizer = Literal["adamw", "adamw_8bit"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
UnmaskedKernel = Literal["flash", "efficient"]
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama/Qwen2-style decoder that decide its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    """Size of one attention head; None means hidden_size // num_attention_heads."""
    qkv_bias: bool = False
    """Whether q/k/v projections have a bias (Qwen2: yes; Llama: `attention_bias`)."""
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config (`Qwen2Config`, `LlamaConfig`, or a look-alike)."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2's attention hard-codes bias=True on q/k/v and none on o; its config has no flag for it.
        qwen2 = getattr(config, "model_type", None) == "qwen2"
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def projections(self) -> dict[str, tuple[int, int, bool]]:
        """``(in_features, out_features, has_bias)`` of each Linear inside one decoder layer."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {
            "q_proj": (h, q, self.qkv_bias), "k_proj": (h, kv, self.qkv_bias), "v_proj": (h, kv, self.qkv_bias),
            "o_proj": (q, h, self.o_bias), "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }


@dataclass(frozen=True)
class TrainingShape:
    """How one micro-batch is trained: the knobs of `CodeLoRAModule` and the data that move memory."""

    seq_len: int = 2048
    """Tokens per window (--data.seq_len)."""
    micro_batch_size: int = 8
    """Windows per forward/backward (--data.batch_size)."""
    quantization: Quantization = "nf4"
    """Base weights in bitsandbytes NF4 ('nf4') or in the compute dtype ('none')."""
    compute_dtype_bytes: int = 2
    """Bytes per value of the compute dtype: 2 for bf16/fp16 (under autocast), 4 for fp32 (no autocast)."""
    lora_rank: int = 8
    """LoRA rank r (--model.lora_rank)."""
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Linears that get adapters (--model.lora_target_modules): the seven projections and/or 'lm_head'."""
    lora_dropout: float = 0.05
    """Only whether it is 0 matters: dropout > 0 keeps a mask per adapter."""
    modules_to_save: tuple[str, ...] = ()
    """Layers trained in full: 'embed_tokens' and/or 'lm_head'."""
    optimizer: Optimizer = "adamw"
    """'adamw' (torch's AdamW) or 'adamw_8bit' (bitsandbytes' 8-bit AdamW, plain or paged: the same bytes)."""
    gradient_checkpointing: bool = False
    """Per-layer non-reentrant checkpointing (--model.gradient_checkpointing)."""
    loss_chunk_size: int | None = 1024
    """Tokens per loss chunk (--model.loss_chunk_size); None: the whole micro-batch at once."""
    attn_implementation: Attention = "sdpa"
    """--model.attn_implementation: 'sdpa', 'eager' or 'flash_attention_2'."""
    packed_windows: bool = True
    """Windows hold several files (position ids restart), so sdpa gets a materialised mask."""
    unmasked_kernel: UnmaskedKernel = "flash"
    """sdpa's kernel for micro-batches without a file boundary (`codetune.model.kernels`): 'flash' keeps key and
    value at their own heads, 'efficient' (Turing, fp32) repeats them to the query heads."""
    device: Device = "cuda"
    """Where the kernels run: only the LoRA dropout mask differs (bool on CUDA, noise in the compute dtype on CPU)."""

    def __post_init__(self) -> None:
        # Lists from a config file are fine; stored as tuples so the shape stays hashable.
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        problems = _training_problems(self)
        if problems:
            raise ConfigError("memory plan: " + "; ".join(problems))

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


def _training_problems(tr: TrainingShape) -> list[str]:
    problems = []
    if tr.seq_len < 2:
        problems.append(f"--data.seq_len={tr.seq_len}: must be >= 2")
    problems += micro_batch_problems(tr.micro_batch_size)
    if tr.quantization not in ("nf4", "none"):
        problems.append(f"quantization={tr.quantization!r}: use 'nf4' or 'none'")
    if tr.compute_dtype_bytes not in (2, FP32):
        problems.append(f"compute_dtype_bytes={tr.compute_dtype_bytes}: use 2 (bf16/fp16) or 4 (fp32)")
    problems += lora_rank_problems(tr.lora_rank)
    if not tr.lora_target_modules:
        problems.append("--model.lora_target_modules is empty: name at least one Linear, e.g. q_proj")
    problems += lora_dropout_problems(tr.lora_dropout)
    if tr.optimizer not in ("adamw", "adamw_8bit"):
        problems.append(f"optimizer={tr.optimizer!r}: use 'adamw' or 'adamw_8bit'")
    problems += loss_chunk_problems(tr.loss_chunk_size)
    if tr.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        problems.append(f"--model.attn_implementation={tr.attn_implementation!r}: use sdpa, eager or "
                        f"flash_attention_2")
    if tr.device not in ("cuda", "cpu"):
        problems.append(f"device={tr.device!r}: use 'cuda' or 'cpu'")
    return problems


def training_shape_for(*, seq_len: int, micro_batch_size: int, quantized_4bit: bool, compute_dtype_bytes: int,
                       lora_rank: int, lora_target_modules: Sequence[str], lora_dropout: float,
                       modules_to_save: Sequence[str], optimizer: str, gradient_checkpointing: bool,
                       loss_chunk_size: int | None, attn_implementation: str, packing: str,
                       device: str, unmasked_kernel: str = "flash") -> TrainingShape:
    """The `TrainingShape` of `CodeLoRAModule`'s knobs, once resolved for the device.

    The one place that maps the module's settings to a plan, for `fit` (the module) and `codetune plan`
    alike. `optimizer` is the resolved name (`resolve_optimizer`); the two bitsandbytes 8-bit AdamWs take
    the same memory. `packing` is `--data.packing`: 'isolated' windows restart position ids at each file,
    which gives sdpa a mask. `device` is a torch device type ('cuda', 'cpu', ...). `unmasked_kernel` is the
    run's `codetune.model.kernels.AttentionPlan.unmasked` ('efficient' repeats k/v; anything else keeps them).
    """
    return TrainingShape(
        seq_len=seq_len, micro_batch_size=micro_batch_size, quantization="nf4" if quantized_4bit else "none",
        compute_dtype_bytes=compute_dtype_bytes, lora_rank=lora_rank, lora_target_modules=tuple(lora_target_modules),
        lora_dropout=lora_dropout, modules_to_save=tuple(modules_to_save),
        optimizer="adamw" if optimizer == "adamw" else "adamw_8bit",
        gradient_checkpointing=gradient_checkpointing, loss_chunk_size=loss_chunk_size,
        attn_implementation=attn_implementation, packed_windows=packing == "isolated",
        unmasked_kernel="efficient" if unmasked_kernel == "efficient" else "flash",
        device="cuda" if device == "cuda" else "cpu")


# Each term of a plan and how the console names it; * marks the transients, of which only the largest counts.
TERM_LABELS = {"cuda_context": "cuda context", "weights_4bit": "weights, 4-bit", "weights_16bit": "weights, 16-bit",
               "lora_params": "trainable params", "lora_grads": "gradients", "optimizer_state": "optimizer state",
               "autocast_copies": "autocast copies", "activations": "activations", "loss_chunk": "loss chunk*",
               "layer_backward": "last layer backward*", "forward_transient": "forward transient*",
               "norm_backward": "norm backward*"}


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated device memory of one training step, in bytes, term by term (see `codetune.memory.estimate`)."""

    cuda_context: int
    weights_4bit: int
    weights_16bit: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    autocast_copies: int
    activations: int
    loss_chunk: int
    layer_backward: int
    forward_transient: int
    norm_backward: int
    model: ModelShape
    training: TrainingShape

    @property
    def persistent(self) -> int:
        """Memory held between steps: context, weights, trainable parameters, their gradients and optimizer state."""
        return (self.cuda_context + self.weights_4bit + self.weights_16bit + self.lora_params + self.lora_grads
                + self.optimizer_state)

    @property
    def step(self) -> int:
        """The micro-batch's own peak: the autocast copies and saved activations plus the largest transient."""
        return self.autocast_copies + self.activations + max(self.loss_chunk, self.layer_backward,
                                                             self.forward_transient, self.norm_backward)

    @property
    def total(self) -> int:
        """Predicted peak device memory (NVML's view: the CUDA context included)."""
        return self.persistent + self.step

    @property
    def on_card_after_load(self) -> int:
        """What is on the card once the model is loaded: the context, the frozen weights and the LoRA parameters."""
        return self.cuda_context + self.weights_4bit + self.weights_16bit + self.lora_params

    @property
    def to_allocate_after_load(self) -> int:
        """What training still allocates after the load: gradients, optimizer state and the step's peak."""
        return self.total - self.on_card_after_load

    def required_free_bytes(self, after_load: bool = False) -> int:
        """The free memory this plan needs, read before loading the model, or after it (`after_load`).

        What training allocates after the load gets `ALLOCATOR_MARGIN` on top for the caching allocator's
        fragmentation; the weights, loaded first into an empty cache, get none.
        """
        step = math.ceil(self.to_allocate_after_load * (1 + ALLOCATOR_MARGIN))
        return step if after_load else self.on_card_after_load + step

    def required_ram_bytes(self) -> int:
        """The available RAM (read once the model is loaded) that training on the CPU needs: what it still allocates,
        times `CPU_RSS_FACTOR`, plus `CPU_RSS_OVERHEAD_BYTES` (see them for the measurement)."""
        return math.ceil(self.to_allocate_after_load * CPU_RSS_FACTOR) + CPU_RSS_OVERHEAD_BYTES

    def fits(self, free_bytes: int) -> bool:
        """Whether the plan fits `free_bytes` read before the model was loaded (an empty card), margin included."""
        return self.required_free_bytes() <= free_bytes

    def fits_after_load(self, free_bytes_now: int) -> bool:
        """Whether the plan fits `free_bytes_now`, read once the weights and LoRA parameters are on the card.

        Comparing the free memory after the load with the whole plan would count the weights twice.
        """
        return self.required_free_bytes(after_load=True) <= free_bytes_now

    def terms(self) -> dict[str, int]:
        """Every term by name, in TERM_LABELS order (the console summary and the manifest list them)."""
        return {name: getattr(self, name) for name in TERM_LABELS}


class CheckpointingChoice(NamedTuple):
    """Whether gradient checkpointing is on, and the plan of the micro-batch with that choice."""

    plan: MemoryPlan
    gradient_checkpointing: bool


@dataclass(frozen=True)
class MicroBatchChoice:
    """A micro-batch size that fits, the accumulation that keeps the effective batch, and its plan."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    plan: MemoryPlan
