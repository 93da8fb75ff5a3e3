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
    record = SessionRecord(log, max_steps=2500)
    record.record(1150)
    first = json.loads(log.read_text())
    record.record(1200)
    earlier, now = json.loads(log.read_text())
    assert len(first) == 2 and first[1]["step"] == 1150 and earlier == first[0]
    assert now["step"] == 1200 and now["max_steps"] == 2500 and now["started"] == first[1]["started"] <= now["ended"]
