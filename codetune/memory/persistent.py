"""Bytes held for the whole run: the CUDA context, the frozen weights, the trainable parameters, their gradients
and the optimizer's state. Notation as in `codetune.memory.estimate`.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from codetune.memory.shapes import FP32, PROJECTIONS, ModelShape, Optimizer, TrainingShape
from codetune.memory.units import MiB

# "around 400MB if CUDA >= 11.7 is used and lazy module loading enabled" (pytorch/pytorch#109888).
CUDA_CONTEXT_BYTES = 400 * MiB
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_CODE_BYTES = 16 * FP32
# bitsandbytes' 8-bit optimizers keep fp32 states for tensors smaller than this (`min_8bit_size`).
BNB_MIN_8BIT_SIZE = 4096
BNB_8BIT_BLOCKSIZE = 256


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
    layer = [shapes[name][:2] for name in PROJECTIONS if name in targets]
    head = [(model.hidden_size, model.vocab_size)] if "lm_head" in targets else []
    return layer * model.num_hidden_layers + head


def trainable_tensors(model: ModelShape, training: TrainingShape) -> list[tuple[int, int]]:
    """``(numel, bytes per value)`` of each trainable tensor: LoRA A and B (fp32), full copies (compute dtype)."""
    r = training.lora_rank
    tensors = []
    for n_in, n_out in _adapted_linears(model, training.lora_target_modules):
        tensors += [(r * n_in, FP32), (n_out * r, FP32)]
    full = model.vocab_size * model.hidden_size
    tensors += [(full, training.compute_dtype_bytes) for _ in training.modules_to_save]
    return tensors


# -- bytes ---------------------------------------------------------------------------------------


def weight_bytes(model: ModelShape, training: TrainingShape) -> tuple[int, int]:
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

