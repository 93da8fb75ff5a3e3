"""The callback every fit of the check carries (`--trainer.callbacks+=`): what each optimizer step did."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class StepRecorder(Callback):
    """Records every optimizer step (loss, wall time, tokens, micro-batch) and the trainable weights' update.

    Args:
        keep_update: Keep the update itself (final - initial trainable weights, flattened, fp32 on the CPU)
            for a comparison between runs; the norm is always kept.
    """

    def __init__(self, keep_update: bool = False) -> None:
        self.keep_update = keep_update
        self.steps: list[dict[str, Any]] = []
        self.update: torch.Tensor | None = None
        self.update_norm: float | None = None
        self.scaler_scale: float | None = None
        self.precision: str | None = None
        self.max_token_id: int | None = None
        self._initial: dict[str, torch.Tensor] = {}
        self._last = 0.0

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            # The peaks then describe training steps, not the loading of the base before them.
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._initial = {n: p.detach().float().cpu().clone() for n, p in pl_module.named_parameters()
                         if p.requires_grad}
        windows = trainer.datamodule.train_windows
        self.max_token_id = int(windows.input_ids.max()) if len(windows) else None
        self._last = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()  # the step read its loss back already: the device's work is done
        loss = trainer.callback_metrics.get("train/loss")
        self.steps.append({"step": trainer.global_step, "loss": None if loss is None else float(loss),
                           "seconds": now - self._last, "tokens": int(batch["input_ids"].numel()),
                           "micro_batch_size": int(pl_module.micro_batch_size)})
        self._last = now

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        final = {n: p.detach().float().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
        update = torch.cat([(final[n] - self._initial[n]).reshape(-1) for n in sorted(final)])
        self.update_norm = float(update.norm())
        self.update = update if self.keep_update else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        self.precision = str(trainer.precision)
