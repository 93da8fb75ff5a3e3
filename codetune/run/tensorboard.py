"""The run's TensorBoard logger: Lightning's, without the `epoch` panel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

EPOCH_KEY = "epoch"


class EpochlessTensorBoardLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger``, except that no ``epoch`` scalar is written.

    Lightning adds ``epoch`` (the current epoch) to every batch of metrics that ``self.log`` produces
    (``_LoggerConnector.log_metrics``), so TensorBoard's first panel is a staircase that says nothing
    the step axis does not. This logger drops that key and writes everything else as Lightning's does;
    a metric that a module logs under the bare name ``epoch`` is dropped too (log it under another name,
    e.g. ``train/epoch``). Every argument is ``TensorBoardLogger``'s.

    Example (what ``codetune fit`` uses by default)::

        trainer:
          logger:
            class_path: codetune.run.tensorboard.EpochlessTensorBoardLogger
            init_args: {save_dir: runs/demo, name: tensorboard, version: "", default_hp_metric: false}
    """

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != EPOCH_KEY}, step)
