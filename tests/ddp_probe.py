"""A callback for the DDP test's training processes: each rank writes what it ended with."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankReport(Callback):
    """Writes `rank<r>.json` into the run directory: micro-batch and a digest of the trainable weights."""

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {n: p.detach().double() for n, p in pl_module.named_parameters() if p.requires_grad}
        report = {"micro_batch_size": pl_module.micro_batch_size,
                  "weight_sum": sum(float(w.sum()) for w in weights.values()),
                  "weight_abs_sum": sum(float(w.abs().sum()) for w in weights.values())}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report))
