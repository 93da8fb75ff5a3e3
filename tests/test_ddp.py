"""Two CPU processes (gloo): windows sharded across ranks, one manifest, OOM back-off on every rank."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    # epoch's last step rank 1 has no window at all (the uneven tail every real dataset has). Left-to-right only:
    # FIM samples' sentinels add a window; the other DDP tests train with FIM.
    result, run_dir = run_ddp(tmp_path, "shard", "--data.seq_len", "96", "--trainer.max_epochs", "2",
                              "--data.fim_rate", "0",
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
    # The shuffle differs between epochs.
    rank0_first = [batch for e, step, batch in records[:4] if step in (1, 3)]  # rank 0's lines come first
    assert len(rank0_first) == 2 and rank0_first[0] != rank0_first[1]

    # Rank zero alone wrote the run's files: one manifest, one segment, one samples/ set, one adapter.
    assert manifest["status"] == "completed" and len(manifest["segments"]) == 1
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    assert stats["optimizer_steps"] == 4 and stats["tokens_trained"] == 2 * windows * 96, "all ranks' tokens"
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["MANIFEST.json", "rank0.json", "rank1.json"]
    assert result.stdout.count("phase_6_export") == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_ranks_train_the_adapter_one_process_trains_at_the_same_global_batch(tmp_path):
    """2 ranks x micro-batch 2 x 2 accumulation == 1 process x 4 x 2: every step is the same 8 windows, so the
    adapters must be equal, also through the uneven last step (1 window on rank 0, none on rank 1) and with
    unequal target counts per rank (each rank's files start at other places). Averaging per-rank means, as
    before, halved the tail step's gradient (norm 1.16 instead of 2.33) and weighted the ranks wrongly: the
    adapters then differed by 0.010."""
    # No clipping: the norms here are about 1.3-2.4, and clipping to 1 would hide a halved gradient.
    window = ("--data.seq_len", "96", "--trainer.max_epochs", "2", "--data.gradient_accumulation_steps", "2",
              "--generation.base_eval", "false", "--model.max_grad_norm", "0")
    result, ddp_dir = run_ddp(tmp_path, "two", *window)
    repo = tmp_path / "repo"
    single = fit_command(repo, tmp_path / "runs", "one", *window, "--data.batch_size", "4",
                         "--model.lora_dropout", "0.0")
    result = subprocess.run(single, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ddp_dir, tmp_path / "runs" / "one"))
    assert two.keys() == one.keys()
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-2, "training moved the adapter"
    manifests = [json.loads((d / "MANIFEST.json").read_text())["phase_results"]["phase_4_training"]
                 ["training_stats"] for d in (ddp_dir, tmp_path / "runs" / "one")]
    assert manifests[0]["optimizer_steps"] == manifests[1]["optimizer_steps"] == 4
    # The logged loss is the global batch's mean on every rank, as in one process.
    assert manifests[0]["final_train_loss"] == pytest.approx(manifests[1]["final_train_loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_modules_to_save_and_fp32_lora_all_reduce_together(tmp_path):
    # The demo trains embed_tokens and lm_head in full: in bf16 they are bf16 next to the fp32 LoRA weights.
    _, run_dir = run_ddp(tmp_path, "mixed", "--model.dtype", "bfloat16", "--trainer.max_steps", "2")
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["phase_results"]["phase_3_model"]["dtype"] == "bfloat16"
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32, torch.bfloat16}


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
