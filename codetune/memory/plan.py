"""Peak GPU memory of one QLoRA training step, and the largest micro-batch that fits a card.

The estimate is a sum of closed-form terms, each a count of bytes that a named tensor takes, for a
Llama/Qwen2-style decoder (RMSNorm, rotary attention with grouped KV heads, gated SiLU MLP)
fine-tuned the way `codetune.model` does it: base weights frozen (4-bit NF4 or in the compute
dtype), peft LoRA adapters, the chunked loss of `codetune.model.loss`. Two numeric paths exist:

- 16-bit compute dtype (bf16, or fp16 on cards before compute capability 8.0): the step runs
  under autocast (Lightning's ``bf16-mixed`` / ``16-mixed``); the LoRA A/B weights stay fp32 but
  peft's input cast is off, so an adapter sees the 16-bit input as is and autocast runs A and B in
  16-bit (no fp32 copy of any input). fp16's GradScaler adds a few scalars, so both take the
  same bytes.
- fp32 (the CPU default): no autocast, everything in fp32.

Notation: ``T = micro_batch x seq_len`` tokens, ``h`` hidden size, ``i`` MLP size, ``L`` layers,
``nh`` / ``nkv`` query / key-value heads of size ``d``, ``V`` vocabulary, ``r`` LoRA rank, ``p``
bytes of the compute dtype (16-bit: 2, fp32: 4). Sizes are in bytes; ``GiB = 2**30``.

Held for the whole run (``persistent``):

- ``cuda_context``: `CUDA_CONTEXT_BYTES` = 400 MiB, the CUDA driver context plus the kernels that
  CUDA >= 11.7 loads lazily. PyTorch maintainers quote "around 400MB" for it
  (pytorch/pytorch#109888; ~300 MB in #107667). torch's allocator never counts it; NVML does.
- ``weights_4bit``: every decoder ``nn.Linear`` weight (q/k/v/o/gate/up/down) in bitsandbytes NF4
  with double quantization, as `load_causal_lm` asks: 4-bit codes packed two to a byte, one 8-bit
  absmax per block of 64 values, one fp32 absmax per 256 of those, plus a fp32 offset and the
  16-entry NF4 code table per tensor. Per tensor of n values::

      ceil(n/2) + ceil(n/64) + 4 ceil(n/64/256) + 4 + 64   (about 4.127 bits per value)

- ``weights_16bit``: what bitsandbytes leaves unquantized, in the compute dtype (so 2 bytes in
  16-bit, 4 in fp32): the embedding, ``lm_head`` when untied, RMSNorm weights, projection biases
  (Qwen2: q/k/v). With ``quantization="none"`` every weight is here.
- ``lora_params``: the trainable parameters. LoRA A and B matrices are fp32 whatever the base
  dtype (peft's ``autocast_adapter_dtype``): ``4 r (in + out)`` per adapted Linear per layer.
  ``modules_to_save`` layers (``embed_tokens``, ``lm_head``) are trainable *copies* in the
  compute dtype next to the frozen original (peft does not share them, even when tied).
- ``lora_grads``: one gradient per trainable parameter, in its dtype (kept across the
  micro-batches of a gradient-accumulation step).
- ``optimizer_state``: ``adamw`` (`torch.optim.AdamW`): exp_avg and exp_avg_sq in the parameter's
  dtype, so 8 bytes per fp32 LoRA value; no fp32 master copy exists because the LoRA weights are
  fp32 already. ``adamw_8bit``, bitsandbytes' 8-bit AdamW, plain or paged (the same bytes): two
  uint8 states plus two fp32 absmax per 256 values (2.03 bytes per value) for tensors of at least
  4096 values (`BNB_MIN_8BIT_SIZE`), fp32 states for smaller ones. The paged variant puts only the
  uint8 states of tensors of at least 100,000 values in CUDA managed memory, which the driver may
  move to the host under pressure and torch's allocator does not count (for a 1.5B Qwen2: no LoRA
  tensor at rank 8, 23 MiB at rank 16); counted here as resident.

One training step (``step``):

- ``autocast_copies`` (16-bit only): autocast casts each fp32 LoRA weight to 16-bit at its first
  use and caches the copy until its region ends, which is after the optimizer step: ``p`` bytes
  per LoRA value, once per step whatever the micro-batch.
- ``activations``: what autograd (and the checkpoint closures) hold at the end of one micro-batch's
  forward. Per decoder layer and token (a layer whose input requires grad), LoRA on every
  projection:

  * each RMSNorm: its input upcast to fp32 and the rsqrt, ``4 h + 4`` (x2 per layer);
  * the adapters on Linears that share an input of width ``n`` (q/k/v; o; gate/up; down), which
    see it in the compute dtype: with dropout 0, A saves the shared input once, ``p n``, and B
    saves each A's output, ``p r`` per adapter. With dropout > 0 each adapter keeps its own
    dropout mask (bool on CUDA, 1 byte; on CPU the scaled noise, ``p`` bytes) and dropout output,
    ``(mask + p) n + p r``. Without dropout o_proj's input is SDPA's output and down_proj's the MLP
    product, both already counted, so they add only ``p r``;
  * the gated MLP: gate (SiLU's input), SiLU's output and up (the product's inputs), ``3 i p``;
  * attention, ``sdpa`` without a mask (flash kernel on CUDA, GQA native): q, k, v, output and the
    fp32 log-sum-exp, ``(2 nh + 2 nkv) d p + 4 nh``, no ``[s, s]`` tensor. Where flash cannot run (compute
    capability below 8.0, or fp32; `codetune.model.kernels`) the memory-efficient kernel does, with k and v
    repeated to ``nh`` heads: ``4 nh d p + 4 nh`` (`TrainingShape.unmasked_kernel`). Packed windows (the
    position ids restart at each file, so transformers builds a block-diagonal mask) change that:
    k and v are repeated to ``nh`` heads and SDPA converts the boolean mask to a ``[b, 1, s, s]``
    compute-dtype bias in *every* layer and saves it: ``4 nh d p + 4 nh + s p``.
    ``flash_attention_2``: like unmasked sdpa (packing goes through varlen, without a mask).
    ``eager``: q and the repeated k, v, ``3 nh d p``, plus the ``[b, nh, s, s]`` attention
    probabilities in fp32 and their compute-dtype copy, ``nh s (4 + p)`` (``4 nh s`` in fp32).

  The first layer is cheaper: its input (the frozen embedding's output) does not require grad, so
  its first RMSNorm and the q/k/v dropout masks are not saved. Once per step: the rotary cos/sin
  ``2 T d p``, the final RMSNorm ``(4 h + 4) T``, and what the loss keeps: chunked, its inputs
  (the final hidden states ``T h p`` and int64 targets ``8 T``); plain, the fp32 log-probabilities
  ``4 n V`` and targets ``8 n`` (``n = b (s - 1)``).

  With gradient checkpointing (non-reentrant, per layer) a layer keeps only its input, ``T h p``
  per layer, plus the step-wide tensors above and the ones the checkpoint closures hold (cos/sin,
  and the ``[b, 1, s, s]`` boolean packing mask, ``b s^2`` bytes; eager: its float mask).

On top of those comes the largest of four transients, moments that never overlap:

- ``loss_chunk``: `causal_lm_loss_sum` runs one chunk of ``c = loss_chunk_size`` tokens at a time
  (``c`` counts tokens of the whole micro-batch, not of one row). Backward through a chunk holds
  three fp32 ``[c, V]`` buffers at once (the log-probabilities, their gradient, the logits'
  gradient): ``12 c V``; the gradients of the chunks done so far wait to be joined, ``(T - c) h p``.
  The plain path (``loss_chunk_size`` None or >= T) saved its log-probabilities already, so
  backward adds ``8 n V``. A trainable ``lm_head`` adds its weight gradient's buffer, ``V h p``.
- ``norm_backward``: the final RMSNorm's backward holds five fp32 ``[T, h]`` buffers at once
  (``20 h``), once the loss's saved tensors are gone.
- ``layer_backward``: backward through the last decoder layer, once the loss's and the final norm's
  saved tensors are freed. Its MLP's backward: one incoming ``[T, h]`` gradient and three ``[T, i]``
  ones (the product's, and the two it gives SiLU's output and up), ``h p + 3 i p``, minus the down
  adapter's saved tensors, freed by then. With checkpointing, backward first re-runs the layer's
  forward, which brings back one layer's activations (in fp32 its first norm's input is the
  checkpointed input itself), and the larger moment may be the end of that re-run: the final
  norm's two incoming gradients (``2 h p``), and held but not saved, the MLP input and, in 16-bit,
  the residual (``h p`` each), the MLP product (``i p``, unless LoRA saved it) and the down
  projection's base output (``h p``).
- ``forward_transient`` (without checkpointing): at the end of the last layer's forward, alive but
  not saved: the embeddings and the attention mask (held by the model's forward), the layer's
  input and residual (16-bit only; fp32 norms save them), the MLP input, the product (unless LoRA
  saved it), the down projection's output, and LoRA's two ``[T, h]`` outputs (B's and its scaled
  copy, ``p`` each); minus the final norm's and the loss's saved tensors, not made yet.

``total = persistent + autocast_copies + activations + max(loss_chunk, norm_backward,
layer_backward, forward_transient)``.

Fitting a card. `MemoryPlan.fits` takes the free memory of an empty card (`codetune plan`);
`MemoryPlan.fits_after_load` the free memory read once the weights and LoRA parameters are on it
(the module's ``--data.batch_size auto`` and ``--model.gradient_checkpointing auto``), so that it
compares only what is still to be allocated. Both add `ALLOCATOR_MARGIN` (10%) to what training
allocates after the load, for the caching allocator's fragmentation. The margin assumes expandable
segments (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), which codetune sets unless you set
the variable yourself (`codetune.memory.allocator`); without them the step's fragmentation can exceed it.

What it ignores: allocator rounding (the margin covers it), cuBLAS/bitsandbytes workspaces and the
transient dequantized weight of one projection in backward (``out x in x p``, under 30 MB for a
1.5B model), the batch's token tensors (a few MB), the optimizer step's own temporaries (AdamW's
foreach buffers, a few bytes per LoRA value, when activations are already freed), and other
processes on the card.

Error target: ``total - cuda_context`` within 10% of ``torch.cuda.max_memory_allocated`` over a
training step on a real GPU (NVML's peak adds the context and the allocator's reserve on top).
Not yet checked on a GPU (none was available). `tests/memory/test_memory_plan.py` checks the parameter
counts exactly against real model definitions (meta device), and the other terms against what a
tiny Qwen2 really holds on CPU (saved-tensor hooks and a live-storage tracker; fp32 without
autocast, bf16 and fp16 under CPU autocast with the LoRA input cast off, and NF4): the saved
activations and the autocast copies to the byte, the step's peak within 0.5% (to a few bytes in
every measured configuration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from codetune.errors import ConfigError

GiB = 2**30
# Linear layers that get adapters by default; `CodeLoRAModule` uses the same list.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# "around 400MB if CUDA >= 11.7 is used and lazy module loading enabled" (pytorch/pytorch#109888).
CUDA_CONTEXT_BYTES = 400 * 2**20
# The caching allocator reserves more than it hands out: blocks are rounded up (512 B, 2 MiB segments for
# mid-sized tensors) and a cached segment split for a smaller tensor leaves a gap. Reserved memory is
# typically 5-15% above the allocated peak; a step here frees three ~0.6 GB loss buffers and then carves
# the last layer's re-run out of them, a pattern that fragments, so the midpoint, not the low end. That
# assumes expandable segments, as codetune sets them (codetune/memory/allocator.py): segments grow in place and freed
# memory serves requests of other sizes; with fixed segments the gaps of that pattern can exceed the margin.
ALLOCATOR_MARGIN = 0.10
# On the CPU the process's resident memory grows by more than the tensors the plan counts: the heap keeps freed
# blocks for reuse and CPU kernels (oneDNN, SDPA's backward) allocate scratch. Measured on tiny fits (fp32, sdpa,
# packed windows; peak RSS over the RSS at the first step): 2.3x the plan's to-allocate at 8 x 256 tokens, 2.06x at
# 4 x 1024, 1.75x at 4 x 2048, 1.56x at 2 x 4096 (about 1.4x + 70 MiB), so RAM is checked for twice the plan plus
# 256 MiB: uncertain, and the cost of a wrong "fits" is a machine swapping to a halt.
CPU_RSS_FACTOR = 2.0
CPU_RSS_OVERHEAD_BYTES = 256 * 2**20
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_CODE_BYTES = 16 * 4
# bitsandbytes' 8-bit optimizers keep fp32 states for tensors smaller than this (`min_8bit_size`).
BNB_MIN_8BIT_SIZE = 4096
BNB_8BIT_BLOCKSIZE = 256
# Log-probabilities, their gradient and the logits' gradient, all fp32, during a chunk's backward.
LOSS_FP32_BUFFERS = 3
FP32 = 4
INT64 = 8

Quantization = Literal["nf4", "none"]
Optimizer = Literal["adamw", "adamw_8bit"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
UnmaskedKernel = Literal["flash", "efficient"]
Device = Literal["cuda", "cpu"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FULL_MODULES = ("embed_tokens", "lm_head")


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


# Each term of a plan and how the console names it; * marks the transients, of which only the largest counts.
TERM_LABELS = {"cuda_context": "cuda context", "weights_4bit": "weights, 4-bit", "weights_16bit": "weights, 16-bit",
               "lora_params": "trainable params", "lora_grads": "gradients", "optimizer_state": "optimizer state",
               "autocast_copies": "autocast copies", "activations": "activations", "loss_chunk": "loss chunk*", "layer_backward": "last layer backward*",
               "forward_transient": "forward transient*", "norm_backward": "norm backward*"}


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated device memory of one training step, in bytes, term by term (see the module docstring)."""

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
        """The micro-batch's own peak: saved activations plus the largest of the three transients."""
        return self.autocast_copies + self.activations + max(self.loss_chunk, self.layer_backward, self.forward_transient,
                                                            self.norm_backward)

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


# -- parameter counts --------------------------------------------------------------------------


def base_parameter_count(model: ModelShape) -> int:
    """Parameters of the base model as transformers counts them (a tied head counted once)."""
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
    return embeddings + model.num_hidden_layers * _layer_parameters(model) + model.hidden_size


def quantized_parameter_count(model: ModelShape) -> int:
    """Values that bitsandbytes stores in NF4: the weights of every decoder Linear."""
    return model.num_hidden_layers * sum(n_in * n_out for n_in, n_out, _ in model.projections().values())


def lora_parameter_count(model: ModelShape, rank: int, target_modules: tuple[str, ...] | list[str]) -> int:
    """LoRA A and B values: ``r (in + out)`` per adapted Linear."""
    return sum(rank * (n_in + n_out) for n_in, n_out in _adapted_linears(model, tuple(target_modules)))


def nf4_bytes(numel: int) -> int:
    """Bytes of one tensor in NF4 with double quantization (blocks of 64, absmax blocks of 256)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + FP32 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + FP32 + NF4_CODE_BYTES


def _layer_parameters(model: ModelShape) -> int:
    linear = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in model.projections().values())
    return linear + 2 * model.hidden_size


def _adapted_linears(model: ModelShape, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """``(in, out)`` of every Linear that gets an adapter, all layers."""
    shapes = model.projections()
    layer = [shapes[name][:2] for name in _PROJECTIONS if name in targets]
    head = [(model.hidden_size, model.vocab_size)] if "lm_head" in targets else []
    return layer * model.num_hidden_layers + head


def _trainable_tensors(model: ModelShape, training: TrainingShape) -> list[tuple[int, int]]:
    """``(numel, bytes per value)`` of each trainable tensor: LoRA A and B (fp32), full copies (compute dtype)."""
    r = training.lora_rank
    tensors = []
    for n_in, n_out in _adapted_linears(model, training.lora_target_modules):
        tensors += [(r * n_in, FP32), (n_out * r, FP32)]
    full = model.vocab_size * model.hidden_size
    tensors += [(full, training.compute_dtype_bytes) for _ in training.modules_to_save]
    return tensors


# -- persistent memory ---------------------------------------------------------------------------


def _weight_bytes(model: ModelShape, training: TrainingShape) -> tuple[int, int]:
    """(NF4 bytes, compute-dtype bytes) of the frozen base model."""
    p = training.compute_dtype_bytes
    if training.quantization == "none":
        return 0, base_parameter_count(model) * p
    weights = [n_in * n_out for n_in, n_out, _ in model.projections().values()]
    quantized = model.num_hidden_layers * sum(nf4_bytes(n) for n in weights)
    return quantized, (base_parameter_count(model) - quantized_parameter_count(model)) * p


def optimizer_state_bytes(tensors: Sequence[tuple[int, int]], optimizer: Optimizer) -> int:
    """The state `optimizer` keeps for trainable tensors given as ``(values, bytes per value)``: the plan's
    ``optimizer_state`` term (see the module docstring)."""
    if optimizer == "adamw":
        # exp_avg and exp_avg_sq, each like the parameter.
        return sum(2 * numel * size for numel, size in tensors)
    total = 0
    for numel, _ in tensors:
        if numel < BNB_MIN_8BIT_SIZE:
            total += 2 * FP32 * numel
        else:
            total += 2 * (numel + FP32 * math.ceil(numel / BNB_8BIT_BLOCKSIZE))
    return total


# -- one step ------------------------------------------------------------------------------------


def autocast_copy_bytes(model: ModelShape, training: TrainingShape) -> int:
    """The 16-bit copies autocast makes of the fp32 LoRA weights (0 with an fp32 compute dtype).

    Autocast casts a trainable fp32 leaf once per region and caches the copy until the region ends,
    which Lightning's precision plugin puts around the whole training step (every micro-batch and
    the optimizer step): ``p`` bytes per LoRA value. Full copies (`modules_to_save`) are in the
    compute dtype already and need none.
    """
    if training.compute_dtype_bytes == FP32:
        return 0
    lora = lora_parameter_count(model, training.lora_rank, training.lora_target_modules)
    return lora * training.compute_dtype_bytes


# -- activations ---------------------------------------------------------------------------------


def saved_activation_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Bytes that autograd (and the checkpoint closures) hold at the end of one micro-batch's forward."""
    t, h, p = training.tokens, model.hidden_size, training.compute_dtype_bytes
    rope = 2 * t * model.head_size * p
    final_norm = t * _rms_norm_bytes(h)
    shared = rope + final_norm + _loss_saved_bytes(model, training)
    if training.gradient_checkpointing:
        return shared + model.num_hidden_layers * t * h * p + _closure_mask_bytes(training, p)
    embedding_trainable = "embed_tokens" in training.modules_to_save
    first = _layer_bytes_per_token(model, training, input_requires_grad=embedding_trainable)
    rest = _layer_bytes_per_token(model, training, input_requires_grad=True)
    return shared + t * (first + (model.num_hidden_layers - 1) * rest)


def layer_activation_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Bytes one decoder layer saves for backward (input requiring grad), for the whole micro-batch."""
    return training.tokens * _layer_bytes_per_token(model, training, input_requires_grad=True)


def _layer_bytes_per_token(model: ModelShape, training: TrainingShape, input_requires_grad: bool) -> int:
    """Saved bytes per token of one decoder layer, following which tensors require grad."""
    targets = set(training.lora_target_modules)
    shapes = model.projections()
    h, i, p = model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    x_grad = input_requires_grad
    total = _rms_norm_bytes(h) if x_grad else 0
    total += _lora_group_bytes(shapes, ("q_proj", "k_proj", "v_proj"), targets, training, x_grad)
    attention_grad = x_grad or bool(targets & {"q_proj", "k_proj", "v_proj"})
    total += _attention_bytes(model, training) if attention_grad else 0
    total += _lora_group_bytes(shapes, ("o_proj",), targets, training, attention_grad)
    if _o_proj_input_is_attention_output(training) and "o_proj" in targets and attention_grad:
        # SDPA's output is laid out [b, s, heads, d], so o_proj's input is the very tensor SDPA saved.
        total -= p * model.num_attention_heads * model.head_size
    residual_grad = x_grad or attention_grad or "o_proj" in targets
    total += _rms_norm_bytes(h) if residual_grad else 0
    total += _lora_group_bytes(shapes, ("gate_proj", "up_proj"), targets, training, residual_grad)
    mlp_grad = residual_grad or bool(targets & {"gate_proj", "up_proj"})
    # SiLU saves gate; the product saves SiLU(gate) and up.
    total += 3 * i * p if mlp_grad else 0
    total += _lora_group_bytes(shapes, ("down_proj",), targets, training, mlp_grad)
    return total


def _lora_group_bytes(shapes: dict[str, tuple[int, int, bool]], group: tuple[str, ...], targets: set[str],
                      training: TrainingShape, input_requires_grad: bool) -> int:
    """Per-token bytes the adapters on Linears sharing one input save.

    The adapters see their input as is, in the compute dtype (fp32, or 16-bit under autocast with peft's
    input cast off), and A's output is in that dtype too.
    """
    adapted = [name for name in group if name in targets]
    if not adapted:
        return 0
    n_in, r, p = shapes[adapted[0]][0], training.lora_rank, training.compute_dtype_bytes
    lora_out = len(adapted) * p * r
    if training.lora_dropout > 0:
        mask = _dropout_mask_bytes(training) if input_requires_grad else 0
        return len(adapted) * (mask + p) * n_in + lora_out
    # No dropout: every A saves the one shared input tensor.
    return p * n_in + lora_out


def _dropout_mask_bytes(training: TrainingShape) -> int:
    # CUDA's fused dropout keeps a bool mask; the CPU kernel keeps its scaled noise, in the input's dtype.
    return 1 if training.device == "cuda" else training.compute_dtype_bytes


def _attention_bytes(model: ModelShape, training: TrainingShape) -> int:
    nh, nkv, d = model.num_attention_heads, model.num_key_value_heads, model.head_size
    p, s = training.compute_dtype_bytes, training.seq_len
    lse = FP32 * nh
    if training.attn_implementation == "eager":
        probabilities = nh * s * (FP32 if p == FP32 else FP32 + p)
        return 3 * nh * d * p + probabilities
    if training.attn_implementation == "sdpa" and training.packed_windows:
        # repeat_kv'd k and v, and the per-layer [b, 1, s, s] bias SDPA makes from the boolean mask.
        return 4 * nh * d * p + lse + s * p
    if training.attn_implementation == "sdpa" and training.unmasked_kernel == "efficient":
        # Memory-efficient attention takes no grouped-query attention: k and v repeated to the query heads.
        return 4 * nh * d * p + lse
    return (2 * nh + 2 * nkv) * d * p + lse


def _o_proj_input_is_attention_output(training: TrainingShape) -> bool:
    # Without dropout o_proj's adapter saves its input as is, and sdpa/flash saved that very tensor.
    return training.lora_dropout == 0 and training.attn_implementation != "eager"


def _lora_saves_product(training: TrainingShape) -> bool:
    # Without dropout down_proj's adapter saves the MLP product itself: it is an activation, not a transient.
    return training.lora_dropout == 0 and "down_proj" in training.lora_target_modules


def _rms_norm_bytes(hidden: int) -> int:
    # The fp32 upcast of the input (the input itself when it is fp32) and one fp32 rsqrt per token.
    return FP32 * hidden + FP32


def _loss_saved_bytes(model: ModelShape, training: TrainingShape) -> int:
    """What the loss keeps for backward: chunked, the final hidden states and the shifted int64 targets
    (inputs of its checkpoints); plain, the fp32 log-probabilities and the targets."""
    t, n = training.tokens, _loss_tokens(training)
    if _chunked_loss(training):
        return t * model.hidden_size * training.compute_dtype_bytes + INT64 * t
    return FP32 * n * model.vocab_size + INT64 * n


def _closure_mask_bytes(training: TrainingShape, p: int) -> int:
    """The step-wide attention mask that checkpointed layers keep alive (their keyword arguments)."""
    b, s = training.micro_batch_size, training.seq_len
    if training.attn_implementation == "eager":
        return b * s * s * p
    if training.attn_implementation == "sdpa" and training.packed_windows:
        return b * s * s
    return 0


def _chunked_loss(training: TrainingShape) -> bool:
    """Whether `causal_lm_loss_sum` takes its chunked path (else one plain head call)."""
    return training.loss_chunk_size is not None and training.loss_chunk_size < training.tokens


def _loss_tokens(training: TrainingShape) -> int:
    """Tokens in the loss's largest head call: one chunk, or all shifted positions for the plain path."""
    if _chunked_loss(training):
        return training.loss_chunk_size
    return training.micro_batch_size * (training.seq_len - 1)


def loss_chunk_bytes(model: ModelShape, training: TrainingShape) -> int:
    """The loss's logits buffers on top of the activations at its backward peak.

    Chunked: three fp32 ``[c, V]`` buffers, none of them saved, ``12 c V``, plus the gradients of
    the chunks already done, which wait for the split's backward to join them, ``(T - c) h p``.
    Plain: the fp32 log-probabilities are saved (so in the activations already); backward adds two
    more, ``8 n V``. A trainable ``lm_head`` adds its weight gradient's accumulation buffer, ``V h p``.
    """
    n, h, p = _loss_tokens(training), model.hidden_size, training.compute_dtype_bytes
    if _chunked_loss(training):
        logits = LOSS_FP32_BUFFERS * FP32 * n * model.vocab_size + (training.tokens - n) * h * p
    else:
        logits = (LOSS_FP32_BUFFERS - 1) * FP32 * n * model.vocab_size
    head_grad = model.vocab_size * h * p if "lm_head" in training.modules_to_save else 0
    return logits + head_grad


def layer_backward_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations while backward runs through the last decoder layer.

    With checkpointing, backward first re-runs the layer's forward, which brings back one layer's
    activations; the peak is then the larger of the end of that re-run and the MLP's backward.
    Without checkpointing only the MLP's backward remains (the layer's activations are counted).
    The loss's and the final norm's saved tensors are freed by then.
    """
    t, h, i, p = training.tokens, model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    # In the MLP's backward the down adapter's saved tensors are gone, one incoming [T, h] gradient is left, and
    # three [T, i] gradients are alive: the product's (base plus LoRA) and the two it gives SiLU's output and up.
    down_saved = _lora_group_bytes(model.projections(), ("down_proj",), set(training.lora_target_modules), training,
                                   input_requires_grad=True)
    mlp_backward = h * p + 3 * i * p - down_saved
    freed = _loss_saved_bytes(model, training) + t * _rms_norm_bytes(h)
    if not training.gradient_checkpointing:
        return max(0, t * mlp_backward - freed)
    layer = layer_activation_bytes(model, training)
    if p == FP32:
        # The first RMSNorm saves its input as is, and that is the checkpoint's input, counted already.
        layer -= t * FP32 * h
    # The gradient buffers the final RMSNorm's backward left: two [T, h] in the compute dtype (measured).
    incoming = 2 * h * p
    # Held by the layer's frames, not saved: the MLP input, and the residual when the norm saved an fp32 copy.
    frames = h * p + (h * p if p != FP32 else 0)
    product = 0 if _lora_saves_product(training) else i * p
    down_output = h * p  # peft's 4-bit path clones it, but the original is freed at once
    end_of_rerun = incoming + frames + product + down_output
    return max(0, layer + t * max(end_of_rerun, mlp_backward) - freed)


def forward_transient_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations at the end of the last layer's forward (0 with checkpointing).

    Alive but not saved at that moment: the embeddings and the attention mask (held by the model's
    forward), the layer's input, residual and MLP input (held by frames; in fp32 the norms save the
    first two), the MLP product (unless down_proj's adapter saved it), the down projection's base
    output and two ``[T, h]`` LoRA outputs in the compute dtype (B's output and its scaled copy).
    Not yet alive: the final norm's and the loss's saved tensors.
    """
    if training.gradient_checkpointing:
        return 0  # every checkpointed layer's forward is smaller than the re-run of one in backward
    t, h, i, p = training.tokens, model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    # The embeddings, the layer's input and residual (saved as is by fp32 norms), the MLP input.
    held = h * p + (2 * h * p if p != FP32 else 0) + h * p
    # The MLP product, unless down_proj's adapter saved it (no dropout).
    product = 0 if _lora_saves_product(training) else i * p
    # LoRA B's output and its scaled copy, in the compute dtype.
    product += 2 * p * h if "down_proj" in training.lora_target_modules else 0
    down_output = h * p
    not_yet = _loss_saved_bytes(model, training) + t * _rms_norm_bytes(h)
    excess = t * (held + product + down_output) + _closure_mask_bytes(training, p) - not_yet
    return max(0, excess)


def norm_backward_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations while the final RMSNorm runs its backward.

    Five fp32 ``[T, h]`` buffers are alive at once (the upcast input's gradient through the rsqrt,
    the mean's expanded gradient, and pow's three: its ``x^1``, twice that, and the product with the
    incoming gradient), and the loss's saved tensors are freed by then. Only a small loss chunk
    lets it be the peak.
    """
    return max(0, training.tokens * 5 * FP32 * model.hidden_size - _loss_saved_bytes(model, training))


# -- the plan ----------------------------------------------------------------------------------


def plan_memory(model: ModelShape, training: TrainingShape) -> MemoryPlan:
    """The memory plan of one training step of `model` trained as `training`.

    Raises:
        ConfigError: if a LoRA target or a `modules_to_save` name is not a layer this estimate knows.
    """
    _check_module_names(training)
    tensors = _trainable_tensors(model, training)
    weights_4bit, weights_16bit = _weight_bytes(model, training)
    trainable = sum(numel * size for numel, size in tensors)
    return MemoryPlan(
        cuda_context=CUDA_CONTEXT_BYTES if training.device == "cuda" else 0,
        weights_4bit=weights_4bit,
        weights_16bit=weights_16bit,
        lora_params=trainable,
        lora_grads=trainable,
        optimizer_state=optimizer_state_bytes(tensors, training.optimizer),
        autocast_copies=autocast_copy_bytes(model, training),
        activations=saved_activation_bytes(model, training),
        loss_chunk=loss_chunk_bytes(model, training),
        layer_backward=layer_backward_bytes(model, training),
        forward_transient=forward_transient_bytes(model, training),
        norm_backward=norm_backward_bytes(model, training),
        model=model,
        training=training,
    )


def largest_micro_batch(effective_batch: int, free_bytes: int, model: ModelShape, training: TrainingShape,
                        after_load: bool = False) -> MicroBatchChoice | None:
    """The largest micro-batch dividing `effective_batch` whose plan fits `free_bytes`, or None.

    Every divisor is tried, largest first, so ``micro x accumulation == effective_batch`` always
    holds; `training.micro_batch_size` is ignored. `after_load` says that `free_bytes` was read with
    the model already on the card (`MemoryPlan.fits_after_load`), else on an empty card (`fits`).
    """
    if effective_batch < 1:
        raise ConfigError(f"effective batch {effective_batch}: must be >= 1 (--data.batch_size x "
                          f"--data.gradient_accumulation_steps)")
    for micro in sorted((m for m in range(1, effective_batch + 1) if effective_batch % m == 0), reverse=True):
        plan = plan_memory(model, replace(training, micro_batch_size=micro))
        if _fits(plan, free_bytes, after_load):
            return MicroBatchChoice(micro, effective_batch // micro, plan)
    return None


def plan_with_checkpointing_choice(model: ModelShape, training: TrainingShape, free_bytes: int,
                                   after_load: bool = False) -> CheckpointingChoice:
    """`--model.gradient_checkpointing auto` at `training.micro_batch_size`: off when the plan without it fits.

    Checkpointing re-runs every layer's forward in backward (about a third more compute), so it is
    turned on only when the plan without it does not fit `free_bytes`; then the plan with it is
    returned, whether or not that one fits (the caller warns). `after_load` as in `largest_micro_batch`.
    """
    without = plan_memory(model, replace(training, gradient_checkpointing=False))
    if _fits(without, free_bytes, after_load):
        return CheckpointingChoice(without, False)
    return CheckpointingChoice(plan_memory(model, replace(training, gradient_checkpointing=True)), True)


def largest_micro_batch_with_checkpointing_choice(effective_batch: int, free_bytes: int, model: ModelShape,
                                                  training: TrainingShape,
                                                  after_load: bool = False) -> MicroBatchChoice | None:
    """`--data.batch_size auto` with `--model.gradient_checkpointing auto`: the largest micro-batch that fits
    without checkpointing; only when none does (not even 1), the largest that fits with it. None if neither.

    Without checkpointing even micro-batch 1 is usually faster than a larger one with it: it saves the
    re-run of every layer, and ``seq_len`` tokens already keep the matmuls busy.
    """
    for checkpointing in (False, True):
        choice = largest_micro_batch(effective_batch, free_bytes, model,
                                     replace(training, gradient_checkpointing=checkpointing), after_load)
        if choice is not None:
            return choice
    return None


def largest_fitting(effective_batch: int, free_bytes: int, model: ModelShape, training: TrainingShape,
                    checkpointing_auto: bool, after_load: bool = False) -> MicroBatchChoice | None:
    """What `--data.batch_size auto` picks: `largest_micro_batch`, with the checkpointing choice when
    `--model.gradient_checkpointing auto` (`checkpointing_auto`), else at `training`'s checkpointing."""
    pick = largest_micro_batch_with_checkpointing_choice if checkpointing_auto else largest_micro_batch
    return pick(effective_batch, free_bytes, model, training, after_load)


def plan_for_card(model: ModelShape, training: TrainingShape, free_bytes: int, checkpointing_auto: bool,
                  effective_batch: int | None = None, after_load: bool = False) -> MemoryPlan:
    """The plan fit trains with on a card with `free_bytes` free (`fit` and `codetune plan` alike).

    With `effective_batch` (`--data.batch_size auto`) the micro-batch is `largest_fitting`'s, or 1 when
    none fits (the OOM back-off is then the last resort); otherwise `training.micro_batch_size`. With
    `checkpointing_auto` checkpointing is on only when the step does not fit without it.
    """
    if effective_batch is not None:
        choice = largest_fitting(effective_batch, free_bytes, model, training, checkpointing_auto, after_load)
        if choice is not None:
            return choice.plan
        training = replace(training, micro_batch_size=1)
    if checkpointing_auto:
        return plan_with_checkpointing_choice(model, training, free_bytes, after_load).plan
    return plan_memory(model, training)


def _fits(plan: MemoryPlan, free_bytes: int, after_load: bool) -> bool:
    return plan.fits_after_load(free_bytes) if after_load else plan.fits(free_bytes)


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


def format_plan(plan: MemoryPlan, free_bytes: int | None = None, after_load: bool = False) -> str:
    """A human summary: one line per term, the predicted peak, and whether it fits `free_bytes` (read on an
    empty card, or with the model loaded if `after_load`), the allocator margin included. A CPU plan is
    `format_ram_plan`'s."""
    if plan.training.device == "cpu":
        return format_ram_plan(plan, free_bytes)
    lines = [_plan_header(plan)]
    lines += [f"  {TERM_LABELS[name]:<22} {gib(size):>8} GiB" for name, size in plan.terms().items()]
    lines.append(f"  {'peak':<22} {gib(plan.total):>8} GiB  (* only the largest counts)")
    if free_bytes is not None:
        needed = plan.required_free_bytes(after_load)
        verdict = "fits" if needed <= free_bytes else "does NOT fit"
        state = "free with the model loaded" if after_load else "free"
        lines.append(f"  {verdict} in {gib(free_bytes)} GiB {state}: needs {gib(needed)} GiB with the "
                     f"{ALLOCATOR_MARGIN:.0%} allocator margin (expandable segments; {gib(free_bytes - needed)} "
                     f"GiB left)")
    return "\n".join(lines)


def format_ram_plan(plan: MemoryPlan, available_bytes: int | None = None) -> str:
    """The summary of a CPU plan: RAM, not a card, so no CUDA context and no row that is zero; in MiB under 1 GiB
    (a tiny model's rows would all read 0.00 GiB); with `available_bytes` (read with the model loaded), whether
    `required_ram_bytes` fits it."""
    unit, scale = ("GiB", GiB) if plan.total >= GiB else ("MiB", 2**20)
    lines = [_plan_header(plan)]
    lines += [f"  {TERM_LABELS[name]:<22} {size / scale:>8.2f} {unit}" for name, size in plan.terms().items() if size]
    lines.append(f"  {'peak':<22} {plan.total / scale:>8.2f} {unit}  (* only the largest counts)")
    if available_bytes is not None:
        needed = plan.required_ram_bytes()
        verdict = "fits" if needed <= available_bytes else "does NOT fit"
        lines.append(f"  {verdict} in {gib(available_bytes)} GiB of available RAM: needs {gib(needed)} GiB once the "
                     f"model is loaded (what is left to allocate x{CPU_RSS_FACTOR:g} + "
                     f"{CPU_RSS_OVERHEAD_BYTES // 2**20} MiB for the heap)")
    return "\n".join(lines)


def _plan_header(plan: MemoryPlan) -> str:
    tr = plan.training
    chunk = "none" if tr.loss_chunk_size is None else str(tr.loss_chunk_size)
    return (f"memory plan: micro-batch {tr.micro_batch_size} x {tr.seq_len} tokens, {tr.quantization}, "
            f"{_dtype_label(tr)}, LoRA r{tr.lora_rank}, dropout {tr.lora_dropout:g}, "
            f"checkpointing {'on' if tr.gradient_checkpointing else 'off'}, loss chunk {chunk}, "
            f"{tr.attn_implementation}{' (packed)' if tr.packed_windows else ''}{_repeated_kv_label(plan)}")


def _repeated_kv_label(plan: MemoryPlan) -> str:
    tr, model = plan.training, plan.model
    repeated = tr.attn_implementation == "sdpa" and (tr.packed_windows or tr.unmasked_kernel == "efficient")
    grouped = model.num_key_value_heads != model.num_attention_heads
    return f", k/v repeated to {model.num_attention_heads} heads" if repeated and grouped else ""


def available_ram_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The RAM the kernel can give this process now without swapping (Linux's MemAvailable), or None where
    `meminfo` does not exist or has no such line (not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # in kB
    return None


def _dtype_label(training: TrainingShape) -> str:
    return "fp32" if training.compute_dtype_bytes == FP32 else "16-bit autocast"


def gib(size: int) -> str:
    """`size` bytes in GiB with two decimals, as every plan line shows them."""
    return f"{size / GiB:.2f}"


def _check_module_names(training: TrainingShape) -> None:
    problems = []
    unknown = [name for name in training.lora_target_modules if name not in (*_PROJECTIONS, "lm_head")]
    if unknown:
        problems.append(f"--model.lora_target_modules={list(training.lora_target_modules)}: the estimate knows "
                        f"{[*_PROJECTIONS, 'lm_head']}, not {unknown}")
    unknown = [name for name in training.modules_to_save if name not in _FULL_MODULES]
    if unknown:
        problems.append(f"--model.modules_to_save={list(training.modules_to_save)}: the estimate knows "
                        f"{list(_FULL_MODULES)}, not {unknown}")
    if problems:
        raise ConfigError("memory plan: " + "; ".join(problems))


def _training_problems(tr: TrainingShape) -> list[str]:
    problems = []
    if tr.seq_len < 2:
        problems.append(f"--data.seq_len={tr.seq_len}: must be >= 2")
    if tr.micro_batch_size < 1:
        problems.append(f"--data.batch_size={tr.micro_batch_size}: must be >= 1")
    if tr.quantization not in ("nf4", "none"):
        problems.append(f"quantization={tr.quantization!r}: use 'nf4' or 'none'")
    if tr.compute_dtype_bytes not in (2, 4):
        problems.append(f"compute_dtype_bytes={tr.compute_dtype_bytes}: use 2 (bf16/fp16) or 4 (fp32)")
    if tr.lora_rank < 1:
        problems.append(f"--model.lora_rank={tr.lora_rank}: must be >= 1")
    if not tr.lora_target_modules:
        problems.append("--model.lora_target_modules is empty: name at least one Linear, e.g. q_proj")
    if not 0.0 <= tr.lora_dropout < 1.0:
        problems.append(f"--model.lora_dropout={tr.lora_dropout}: must be in [0, 1)")
    if tr.optimizer not in ("adamw", "adamw_8bit"):
        problems.append(f"optimizer={tr.optimizer!r}: use 'adamw' or 'adamw_8bit'")
    if tr.loss_chunk_size is not None and tr.loss_chunk_size < 1:
        problems.append(f"--model.loss_chunk_size={tr.loss_chunk_size}: must be a positive integer or null")
    if tr.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        problems.append(f"--model.attn_implementation={tr.attn_implementation!r}: use sdpa, eager or "
                        f"flash_attention_2")
    if tr.device not in ("cuda", "cpu"):
        problems.append(f"device={tr.device!r}: use 'cuda' or 'cpu'")
    return problems
