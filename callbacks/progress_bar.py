"""The run's progress bar: Lightning's rich bar with the run's real limits."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the run's real limits and out of the way of the end-of-run lines.

    The description is ``Epoch N/LAST`` when `--trainer.max_epochs` bounds the run, plus ``(max S steps)``
    when `--trainer.max_steps` does (Lightning's own shows ``Epoch 0/-2`` for a run bounded by steps alone).
    The bar stops when training ends, so the evaluation table and the phase lines printed after it are not
    followed by the bar drawn once more; place it first among the callbacks for that.
    """

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        if self.trainer.max_steps > 0:
            description += f" (max {self.trainer.max_steps} steps)"
        # Padded like Lightning's, so the bar does not jump between training and validation.
        return f"{description:{len(self.validation_description)}}"

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_progress()

    @override
    def _stop_progress(self) -> None:
        # Once: off a terminal, rich prints an empty line at every stop (train end, then teardown).
        if not self._progress_stopped:
            super()._stop_progress()
