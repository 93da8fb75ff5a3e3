"""What a resume checks and adjusts in a checkpoint before Lightning restores it: every trainable tensor must come
back (checkpoints hold only those), and the restored optimizer and schedule follow the --model.learning_rate the
resume is given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from codetune.errors import ConfigError

# What decides the adapter's tensors: a checkpoint trained with other values of these cannot be restored.
ADAPTER_FLAGS = ("name_or_path", "lora_rank", "lora_target_modules", "modules_to_save")


def check_restores_every_trainable_tensor(checkpoint: dict[str, Any], trainable: Mapping[str, torch.Tensor],
                                          flags: Mapping[str, Any]) -> None:
    """Checkpoints hold only the trainable tensors, so they load with strict_loading off, which would silently
    keep a fresh adapter for every tensor the checkpoint lacks (another rank or target list at resume). Every
    `trainable` tensor must come back with its shape, or the resume stops (ConfigError) naming the `flags` (this
    run's --model values) that differ from the checkpoint's."""
    saved = checkpoint.get("state_dict", {})
    missing = [k for k in trainable if k not in saved]
    unexpected = [k for k in saved if k not in trainable]
    reshaped = [k for k in trainable if k in saved and tuple(saved[k].shape) != tuple(trainable[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    trained = checkpoint.get("hyper_parameters", {})
    changed = [f"--model.{k} {trained[k]!r} in the checkpoint, {flags[k]!r} now" for k in ADAPTER_FLAGS
               if k in trained and _as_list(trained[k]) != _as_list(flags[k])]
    detail = "; ".join(changed) or (f"{len(missing)} trainable tensor(s) missing (e.g. {(missing or reshaped)[:1]}), "
                                    f"{len(unexpected)} not trainable now")
    raise ConfigError(f"the checkpoint does not fit this model's adapter ({detail}). Resume with the flags it "
                      f"was trained with (its run's config.yaml: make resume RUN=<run dir>), or start a new run "
                      f"without --ckpt_path.")


def rescale_learning_rate(checkpoint: dict[str, Any], learning_rate: float) -> None:
    """A resume honours --model.learning_rate: the restored optimizer and schedule (which hold the rate the
    checkpoint was trained at) are scaled to `learning_rate`, at the same point of the schedule. Resuming at a lower
    rate is the fix after a nan/inf stop; without this the old rate would silently come back."""
    trained_at = checkpoint.get("hyper_parameters", {}).get("learning_rate")
    if not trained_at or trained_at == learning_rate or not checkpoint.get("optimizer_states"):
        return
    scale = learning_rate / trained_at
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            group.update({k: group[k] * scale for k in ("lr", "initial_lr") if k in group})
    for state in checkpoint.get("lr_schedulers", []):
        for key in ("base_lrs", "_last_lr"):
            if key in state:
                state[key] = [lr * scale for lr in state[key]]
    rank_zero_info(f"codetune: resuming at --model.learning_rate={learning_rate:g} (the checkpoint was trained at "
                   f"{trained_at:g}); the schedule goes on from step {checkpoint.get('global_step')}.")


def _as_list(value: Any) -> Any:
    # The same names compare equal whether a flag holds them as a list or a tuple.
    return list(value) if isinstance(value, (list, tuple)) else value
