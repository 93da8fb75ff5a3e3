"""Two CPU processes (gloo): windows sharded across ranks, one manifest, OOM back-off on every rank."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import fit_command, subprocess_env, write_fixture_repo

DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.lora_dropout", "0.0")


def run_ddp(tmp_path: Path, name: str, *extra: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    repo = write_fixture_repo(tmp_path / "repo")
    runs = tmp_path / "runs"
    cmd = fit_command(repo, runs, name, *DDP, *extra)
    # A hang (a rank left waiting in a collective) fails here instead of blocking the suite.
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, runs / name


@pytest.mark.slow
def test_every_window_once_per_epoch_across_ranks_and_one_manifest(tmp_path):
    # Windows of 96 tokens: 9 training windows, 2 ranks x 4 per step: steps of 8 then 1, so in each
    # epoch's last step rank 1 has no window at all (the uneven tail every real dataset has).
    result, run_dir = run_ddp(tmp_path, "shard", "--data.seq_len", "96", "--trainer.max_epochs", "2",
                              "--trainer.callbacks+=probes.SampleLog", "--trainer.callbacks+=probes.RankReport")
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    windows = manifest["phase_results"]["phase_2_tokenize"]["train_windows"]
    assert windows == 9
    records = [json.loads(line) for rank in (0, 1)
               for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        ids = Counter(i for e, _, batch in records if e == epoch for i in batch)
        assert sorted(ids) == list(range(windows)) and set(ids.values()) == {1}, (epoch, ids)
    steps = Counter((rank_step[1]) for rank_step in records)
    assert set(steps.values()) == {2}, "both ranks ran every optimizer step"
    # The shuffle differs between epochs; both ranks ended with the same weights (gradients averaged).
    rank0_first = [batch for e, step, batch in records[:4] if step in (1, 3)]  # rank 0's lines come first
    assert len(rank0_first) == 2 and rank0_first[0] != rank0_first[1]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"], rel=1e-9, abs=1e-9)

    # Rank zero alone wrote the run's files: one manifest, one segment, one samples/ set, one adapter.
    assert manifest["status"] == "completed" and len(manifest["segments"]) == 1
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    assert stats["optimizer_steps"] == 4 and stats["tokens_trained"] == 2 * windows * 96, "all ranks' tokens"
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["MANIFEST.json", "rank0.json", "rank1.json"]
    assert result.stdout.count("phase_6_export") == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_oom_on_one_rank_backs_off_every_rank(tmp_path):
    probe = json.dumps({"class_path": "probes.RankReport"})
    result, run_dir = run_ddp(tmp_path, "ddp", "--trainer.max_epochs", "1", f"--trainer.callbacks+={probe}",
                              CODETUNE_INJECT_OOM="1@1")
    assert "[rank: 1] codetune: out of device memory at step 1" in result.stderr
    assert "[rank: 0] codetune: out of device memory" not in result.stderr  # rank 0 only followed the vote

    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["micro_batch_size"] for r in ranks] == [1, 1]
    # Gradients were averaged over ranks every step, so both ranks hold the same weights.
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"], rel=1e-9, abs=1e-9)
    assert ranks[0]["weight_abs_sum"] == pytest.approx(ranks[1]["weight_abs_sum"], rel=1e-9)

    manifest = json.loads((run_dir / "MANIFEST.json").read_text())  # written by rank 0 alone
    training = manifest["phase_results"]["phase_4_training"]
    assert manifest["status"] == "completed"
    assert [e["step"] for e in training["oom_backoffs"]] == [1]
    assert training["oom_backoffs"][0]["micro_batch_size"] == 1
