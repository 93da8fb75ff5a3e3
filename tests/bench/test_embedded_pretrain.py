"""bench/embedded/pretrain.py: a pretraining session's wall time is on record from its first checkpoint, so one killed
midway (pretraining outlives working sessions) still counts in the model card's cost."""

from __future__ import annotations

import json
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from embedded.pretrain import SessionRecord  # noqa: E402


def test_each_checkpoint_updates_this_sessions_entry_after_the_earlier_ones(tmp_path):
    log = tmp_path / "sessions.json"
    log.write_text(json.dumps([{"started": 1.0, "ended": 2.0, "step": 1100, "max_steps": 1100}]))
    record = SessionRecord(log, max_steps=2500, fim={"spm_rate": 0.0, "line_rate": 0.25})
    record.record(1150)
    first = json.loads(log.read_text())
    record.record(1200)
    earlier, now = json.loads(log.read_text())
    assert len(first) == 2 and first[1]["step"] == 1150 and earlier == first[0]
    assert now["step"] == 1200 and now["max_steps"] == 2500 and now["started"] == first[1]["started"] <= now["ended"]
    assert now["fim"] == {"spm_rate": 0.0, "line_rate": 0.25}, "the session's FIM recipe, which the card lists"


def test_a_trainer_saving_checkpoints_keeps_the_record(tmp_path):
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Linear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    log = tmp_path / "sessions.json"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints, SessionRecord(log, max_steps=3)])
    trainer.fit(Linear(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    [entry] = json.loads(log.read_text())
    assert entry["step"] == 3 and entry["max_steps"] == 3
