"""Two CPU processes (gloo) whose training process group times out after a few seconds, while rank zero's
generation eval takes longer than that: the other rank must wait outside that group, not crash in it."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import fit_command, subprocess_env, write_fixture_repo

GROUP_TIMEOUT = "0:00:10"  # jsonargparse reads a timedelta as h:m:s
EVAL_SLOWER_BY_S = 14.0


@pytest.mark.slow
def test_other_ranks_outwait_a_rank_zero_eval_longer_than_the_group_timeout(tmp_path):
    repo = write_fixture_repo(tmp_path / "repo")
    strategy = json.dumps({"class_path": "lightning.pytorch.strategies.DDPStrategy",
                           "init_args": {"timeout": GROUP_TIMEOUT}})
    slow = json.dumps({"class_path": "probes.SlowRankZeroEval", "init_args": {"seconds": EVAL_SLOWER_BY_S}})
    cmd = fit_command(repo, tmp_path / "runs", "slow", "--trainer.devices", "2", "--trainer.strategy", strategy,
                      "--trainer.max_epochs", "1", f"--trainer.callbacks+={slow}")
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((tmp_path / "runs" / "slow" / "MANIFEST.json").read_text())
    phase = manifest["phase_results"]["phase_5_evaluation"]
    # Both evals (base before training, epoch 0 at its end) ran past the group's timeout on rank zero...
    assert phase["status"] == "completed" and len(phase["epochs"]) == 1
    assert phase["epochs"][0]["eval_seconds"] > EVAL_SLOWER_BY_S
    assert phase["eval_seconds"] > 2 * EVAL_SLOWER_BY_S
    # ...and the base perplexity is the global one: every rank took its share of the held-out loss.
    assert phase["base"]["perplexity"] is not None
    assert manifest["status"] == "completed"
