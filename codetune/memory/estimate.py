"""Peak GPU memory of one QLoRA training step: the byte model, and `plan_memory`, which sums it.

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
bytes of the compute dtype (16-bit: 2, fp32: 4). Sizes are in bytes.

The terms, each a function of `ModelShape` and `TrainingShape`: what is held for the whole run
(``persistent``: CUDA context, weights, trainable parameters, gradients, optimizer state) is in
`codetune.memory.persistent`; one step's autocast copies, saved activations and transients in
`codetune.memory.activations`. Their docstrings give each term's formula.

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
Not yet checked on a GPU (none was available). `tests/memory/test_estimate.py` checks the parameter
counts exactly against real model definitions (meta device), and the other terms against what a
tiny Qwen2 really holds on CPU (saved-tensor hooks and a live-storage tracker; fp32 without
autocast, bf16 and fp16 under CPU autocast with the LoRA input cast off, and NF4): the saved
activations and the autocast copies to the byte, the step's peak within 0.5% (to a few bytes in
every measured configuration).
"""

from __future__ import annotations

from codetune.errors import ConfigError
from codetune.memory.persistent import CUDA_CONTEXT_BYTES, optimizer_state_bytes, trainable_tensors, weight_bytes
from codetune.memory.shapes import FULL_MODULES, PROJECTIONS, MemoryPlan, ModelShape, TrainingShape
from codetune.memory.activations import (autocast_copy_bytes, forward_transient_bytes, layer_backward_bytes,
                                         loss_chunk_bytes, norm_backward_bytes, saved_activation_bytes)


def plan_memory(model: ModelShape, training: TrainingShape) -> MemoryPlan:
    """The memory plan of one training step of `model` trained as `training`.

    Raises:
        ConfigError: if a LoRA target or a `modules_to_save` name is not a layer this estimate knows.
    """
    _check_module_names(training)
    tensors = trainable_tensors(model, training)
    weights_4bit, weights_16bit = weight_bytes(model, training)
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


def _check_module_names(training: TrainingShape) -> None:
    problems = []
    unknown = [name for name in training.lora_target_modules if name not in (*PROJECTIONS, "lm_head")]
    if unknown:
        problems.append(f"--model.lora_target_modules={list(training.lora_target_modules)}: the estimate knows "
                        f"{[*PROJECTIONS, 'lm_head']}, not {unknown}")
    unknown = [name for name in training.modules_to_save if name not in FULL_MODULES]
    if unknown:
        problems.append(f"--model.modules_to_save={list(training.modules_to_save)}: the estimate knows "
                        f"{list(FULL_MODULES)}, not {unknown}")
    if problems:
        raise ConfigError("memory plan: " + "; ".join(problems))

