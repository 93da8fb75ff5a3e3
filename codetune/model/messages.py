"""What a training run says when it stops on numbers: a base model or step that is not finite, an optimizer step or a
validation batch that ran out of memory, and the precision settings that give an overflowing run finite numbers
on the card it runs on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from codetune.memory.persistent import optimizer_state_bytes
from codetune.model.loading import NATIVE_BF16_CAPABILITY


def non_finite_base_message(nll: float, layer: str | None, dtype: torch.dtype | None,
                            precision: Sequence[str]) -> str:
    """What stops a run whose base model computes non-finite numbers before any training step."""
    name = str(dtype).replace("torch.", "")
    where = f", first at the output of {layer}" if layer else ""
    if precision:
        cause = f"its activations overflow {name}'s range{where}"
        fix = "To fix: " + "; or ".join(precision) + "."
    else:
        cause = f"the base model computes non-finite values in {name}{where}"
        fix = ("Its weights may be damaged: check --model.name_or_path (a fresh download, or the directory's "
               "safetensors files).")
    return (f"the base model's held-out loss is {nll} before any training step: {cause}. Nothing was trained and no "
            f"checkpoint was written. {fix}")


def non_finite_step_message(step: int, loss: float, grad_norm: float, checkpoint: str | None, run_dir: Path,
                            learning_rate: float, max_grad_norm: float, precision: Sequence[str] = ()) -> str:
    """What NonFiniteLossError says: what was not finite, what was kept, and what to change."""
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm} while the loss is finite ({loss:.4g}): an overflow in backward"
    else:
        what = (f"another rank's loss or gradient norm is not finite (here: loss {loss:.4g}, gradient norm "
                f"{grad_norm:.4g})")
    fixes = (f"lower --model.learning_rate (now {learning_rate:g}) and keep --model.max_grad_norm > 0 (now "
             f"{max_grad_norm:g})" + "".join(f"; or {fix}" for fix in precision))
    if checkpoint:
        after = (f"The last good checkpoint is {checkpoint}. To fix: {fixes}; then resume from that checkpoint: "
                 f"the same command with --run_name {run_dir.name} --ckpt_path last, or "
                 f"make resume RUN={run_dir} ARGS='--model.learning_rate ...'.")
    else:
        after = (f"No checkpoint was written yet (--checkpoint_every_n_steps N writes one every N steps). "
                 f"To fix: {fixes}; then train again.")
    return (f"training stopped at optimizer step {step}: {what}. The step was not applied: the weights were not "
            f"updated, so they and every checkpoint hold finite values, and no adapter is exported. {after}")


def precision_fixes(dtype: torch.dtype | None, capability: tuple[int, int] | None, residual_scale: int,
                    attn_implementation: str) -> list[str]:
    """What gives an overflowing run finite numbers again, right for the card it runs on: bfloat16 where the card
    has it natively; below compute capability 8.0 (emulated, slow bfloat16) more float16 headroom or float32."""
    if dtype != torch.float16:
        return []
    if capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return ["--model.dtype bfloat16 (what auto trains in on this card; float16 ends at 65504)"]
    fixes = [f"a larger --model.float16_residual_scale (now {residual_scale}, e.g. {residual_scale * 8})"
             if residual_scale > 1 else "--model.float16_residual_scale 32 (1 turned the float16 protection off)"]
    if attn_implementation == "eager":
        fixes.append("--model.attn_implementation sdpa (eager computes the attention scores in float16)")
    card = f"compute capability {capability[0]}.{capability[1]}" if capability else "this device"
    fixes.append(f"--model.dtype float32 (this card, {card}, has no native bfloat16; float32 keeps about twice "
                 f"the activations: `codetune plan --model.dtype float32` shows whether it fits)")
    return fixes


def optimizer_oom_message(step: int, error: str | None, optimizer: str, trainable: Sequence[tuple[int, int]]) -> str:
    """What stops a run whose optimizer step ran out of memory (on this or another rank): what the state of
    `optimizer` takes for the `trainable` tensors (``(values, bytes per value)`` each), and what the 8-bit AdamW
    would save when it is not the one in use."""
    where = f"({error})" if error else "on another rank"
    kind = "adamw" if optimizer == "adamw" else "adamw_8bit"  # the two 8-bit AdamWs keep the same bytes
    state = optimizer_state_bytes(trainable, kind)
    switch = ""
    if kind == "adamw":
        smaller = optimizer_state_bytes(trainable, "adamw_8bit")
        switch = f" --model.optimizer adamw_8bit ({_mib(smaller)} of state, {_mib(state - smaller)} less),"
    return (f"out of device memory in the optimizer step at step {step} {where}: the optimizer's state (allocated "
            f"at the first step; {_mib(state)} with {optimizer} for {sum(n for n, _ in trainable):,} trainable "
            f"values) and the gradients did not fit. The step was not applied. To fit:{switch} "
            f"a smaller --model.lora_rank, fewer --model.lora_target_modules, or close other programs using the GPU; "
            f"then resume with --ckpt_path last (or train again if no checkpoint was written yet).")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def eval_oom_message(seq_len: int) -> str:
    return (f"out of device memory in validation with a micro-batch of one window of {seq_len} tokens. To fit: "
            f"--model.gradient_checkpointing true does not help here; lower --model.loss_chunk_size, use a shorter "
            f"--data.seq_len, or close other programs using the GPU. Resume with --ckpt_path last.")


def full_layers_fix(capability: tuple[int, int] | None) -> str:
    """What trains --model.modules_to_save on this card, where float16 cannot (its GradScaler unscales fp32 only)."""
    if capability is not None and capability < NATIVE_BF16_CAPABILITY:
        return (f"This card (compute capability {capability[0]}.{capability[1]}) has no native "
                f"bfloat16: use --model.dtype float32, or drop --model.modules_to_save.")
    return "Use --model.dtype bfloat16 or float32, or drop --model.modules_to_save."


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint in any ModelCheckpoint's folder (the CLI runs two that share last.ckpt, which the
    interrupt callback writes too, at each epoch's last step): the one a message about a stopped run names."""
    candidates = [path for cb in trainer.checkpoint_callbacks for path in (cb.last_model_path, cb.best_model_path)]
    candidates += [str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
                   for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    paths = {path for path in candidates if path and Path(path).is_file()}
    return max(paths, key=lambda path: Path(path).stat().st_mtime) if paths else None
