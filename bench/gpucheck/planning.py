"""What the VRAM plan says about a fit of the check: the `TrainingShape` production would plan for it, and the
largest micro-batch that fits the emulated card (`codetune.memory.search.largest_micro_batch`)."""

from __future__ import annotations

import warnings
from dataclasses import replace

from codetune.memory.units import GiB

from .arithmetic import model_shape
from .fits import Context
from .settings import EFFECTIVE_BATCH, FitSpec, Mode


def planned_shape(spec: FitSpec, mode: Mode, capability: tuple[int, int] | None):
    """The `TrainingShape` the module would plan for this run (production's resolution of 'auto', and its mapping
    of the module's settings to a plan)."""
    from codetune.memory.shapes import training_shape_for
    from codetune.model.loading import resolve_dtype, resolve_quantization
    from codetune.model.optim import resolve_optimizer

    v = spec.settings()
    device = "cpu" if mode.dry_run else "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolve_quantization warns about 'auto' without CUDA
        quantize = resolve_quantization(v["model.quantization"], device == "cuda")
    dtype = resolve_dtype(v["model.dtype"], device, capability)
    return training_shape_for(
        seq_len=int(mode.seq_len or v["data.seq_len"]), micro_batch_size=int(v["data.batch_size"]),
        quantized_4bit=quantize, compute_dtype_bytes=dtype.itemsize, lora_rank=int(v["model.lora_rank"]),
        lora_target_modules=v["model.lora_target_modules"], lora_dropout=float(v["model.lora_dropout"]),
        modules_to_save=v["model.modules_to_save"],
        optimizer=resolve_optimizer(v["model.optimizer"], quantize, device == "cuda"),
        gradient_checkpointing=v["model.gradient_checkpointing"] is True, loss_chunk_size=v["model.loss_chunk_size"],
        attn_implementation=v["model.attn_implementation"], packing=v["data.packing"], device=device)


def fit_on_card(spec: FitSpec, ctx: Context, capability) -> tuple[FitSpec, str]:
    """The spec at the largest micro-batch the plan fits on the emulated card (checkpointing turned on when
    nothing fits without it), and a note of what was chosen."""
    from codetune.memory.search import largest_micro_batch, largest_micro_batch_with_checkpointing_choice

    shape = model_shape(ctx.mode.model_config)
    # The whole (empty) card: the plan holds the CUDA context itself, which the allocator cap leaves out.
    card = int(ctx.mode.card_gib * GiB)
    shipped = spec.settings()["model.gradient_checkpointing"] is True
    pick = largest_micro_batch if shipped else largest_micro_batch_with_checkpointing_choice
    trial = replace(spec, overrides={**spec.overrides, "model.gradient_checkpointing": "true" if shipped else "false"})
    choice = pick(EFFECTIVE_BATCH, card, shape, planned_shape(trial, ctx.mode, capability))
    if choice is not None:
        checkpointing = "true" if choice.plan.training.gradient_checkpointing else "false"
        overrides = {**spec.overrides, "model.gradient_checkpointing": checkpointing,
                     "data.batch_size": str(choice.micro_batch_size),
                     "data.gradient_accumulation_steps": str(choice.gradient_accumulation_steps)}
        return (replace(spec, overrides=overrides, cap_bytes=ctx.card_cap_bytes),
                f"{choice.micro_batch_size} x {choice.gradient_accumulation_steps}, checkpointing "
                f"{checkpointing}, plan {choice.plan.total / GiB:.2f} GiB")
    raise RuntimeError(f"no micro-batch of {spec.config.name} fits {ctx.mode.card_gib} GiB by the plan, even "
                       f"with checkpointing")
