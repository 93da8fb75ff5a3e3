"""Two CPU processes (gloo): windows sharded across ranks, one manifest, the adapter of one process at the same
global batch, OOM back-off on every rank, each rank's own random generators after a resume."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import fit_command, subprocess_env, write_fixture_repo

DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.lora_dropout", "0.0")


def run_ddp(tmp_path: Path, name: str, *extra: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A 2-rank run on the fixture repository in `tmp_path/repo` (written once), into `tmp_path/runs/name`."""
    repo = tmp_path / "repo" if (tmp_path / "repo").exists() else write_fixture_repo(tmp_path / "repo")
    runs = tmp_path / "runs"
    cmd = fit_command(repo, runs, name, *DDP, *extra)
    # A hang (a rank left waiting in a collective) fails here instead of blocking the suite.
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, runs / name


# Windows of 96 tokens, left-to-right only (FIM's sentinels would add a tenth): 9 training windows; 2 ranks x
# micro-batch 2 x 2 accumulation: steps of 8 windows, then the epoch's tail of 1 (rank 0 holds it, rank 1 none),
# 4 optimizer steps in 2 epochs. No clipping: the gradient norms here are about 1.3-2.4, and clipping to 1 would
# hide a gradient scaled wrongly.
GLOBAL_BATCH = ("--data.seq_len", "96", "--trainer.max_epochs", "2", "--data.gradient_accumulation_steps", "2",
                "--data.fim_rate", "0", "--generation.base_eval", "false", "--model.max_grad_norm", "0")
RESUME_AT = 3  # the checkpoint after epoch 1's first step: a mid-epoch resume, one step left
KEEP = json.dumps({"class_path": "probes.KeepCheckpoint", "init_args": {"step": RESUME_AT}})
PROBES = ("--trainer.callbacks+=probes.RankReport", "--trainer.callbacks+=probes.SampleLog",
          "--trainer.callbacks+=probes.RankSeededDraws",
          "--checkpoint_every_n_steps", str(RESUME_AT), f"--trainer.callbacks+={KEEP}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The reference 2-rank run at GLOBAL_BATCH, with the probes: `tmp/runs/two`; the fixture repo is `tmp/repo`."""
    result, run_dir = run_ddp(tmp_path_factory.mktemp("ddp"), "two", *GLOBAL_BATCH, *PROBES)
    (run_dir.parent / "two.stdout").write_text(result.stdout)
    return run_dir


@pytest.mark.slow
def test_every_window_once_per_epoch_across_ranks_and_one_manifest(two_ranks):
    # Windows of 96 tokens: 9 training windows, 2 ranks x 4 per step: steps of 8 then 1, so in each
    # epoch's last step rank 1 has no window at all (the uneven tail every real dataset has). Left-to-right only:
    # FIM samples' sentinels add a window. The ranks' global generators are seeded apart (RankSeededDraws): the
    # shards must not depend on them.
    run_dir = two_ranks
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
    assert (run_dir.parent / "two.stdout").read_text().count("phase_6_export") == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run_dir: Path, reference_dir: Path) -> None:
    """Equal tensor by tensor up to float summation order (the bugs we fear differ by 1e-3 or more)."""
    got, expected = adapter(run_dir), adapter(reference_dir)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def training_stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "MANIFEST.json").read_text())["phase_results"]["phase_4_training"]


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def rank_draws(run_dir: Path, rank: int) -> dict[int, list[float]]:
    """RankSeededDraws' record: the draws after each optimizer step, by step."""
    lines = (run_dir / f"draws_rank{rank}.jsonl").read_text().splitlines()
    return {step: draws for step, draws in map(json.loads, lines)}


@pytest.mark.slow
def test_two_ranks_train_the_adapter_one_process_trains_at_the_same_global_batch(two_ranks):
    """2 ranks x micro-batch 2 x 2 accumulation == 1 process x 4 x 2: every step is the same 8 windows, so the
    adapters must be equal, also through the uneven last step (1 window on rank 0, none on rank 1) and with
    unequal target counts per rank (each rank's files start at other places). Only dividing every rank's summed
    loss by the global target count gives the one-process gradient: dividing by the rank's own count weights the
    ranks wrongly and about doubles every step's gradient but the tail's (the adapters then differ by 3.6e-3), averaging
    per-rank means halves the tail step's."""
    tmp = two_ranks.parents[1]
    single = fit_command(tmp / "repo", tmp / "runs", "one", *GLOBAL_BATCH, "--data.batch_size", "4",
                         "--model.lora_dropout", "0.0")
    result = subprocess.run(single, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp / "runs" / "one"
    assert_same_adapter(two_ranks, one)
    assert max(v.abs().max().item() for k, v in adapter(one).items() if "lora_B" in k) > 1e-2, "training moved it"
    # Gradients are all-reduced every step, so rank 1 holds rank 0's (saved) weights.
    assert rank_reports(two_ranks)[0] == pytest.approx(rank_reports(two_ranks)[1], rel=1e-9)
    stats = [training_stats(d)["training_stats"] for d in (two_ranks, one)]
    assert stats[0]["optimizer_steps"] == stats[1]["optimizer_steps"] == 4
    # The logged loss is the global batch's mean on every rank, as in one process.
    assert stats[0]["final_train_loss"] == pytest.approx(stats[1]["final_train_loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_modules_to_save_and_fp32_lora_all_reduce_together(tmp_path):
    # The tests' preset trains embed_tokens and lm_head in full: in bf16 they are bf16 next to the fp32 LoRA weights.
    _, run_dir = run_ddp(tmp_path, "mixed", "--model.dtype", "bfloat16", "--trainer.max_steps", "2")
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["phase_results"]["phase_3_model"]["dtype"] == "bfloat16"
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32, torch.bfloat16}


@pytest.mark.slow
def test_oom_on_one_rank_backs_off_every_rank_and_trains_the_adapter_of_a_run_without_it(two_ranks):
    # Step 2 (epoch 1's first: 4 windows per rank) runs out of memory on rank 1's second micro-batch, after one
    # backward; both ranks drop their partial gradients and redo it as 4 x 1 windows. The reference is the same
    # run without the OOM: the back-off must change nothing that is learned.
    result, run_dir = run_ddp(two_ranks.parents[1], "oom", *GLOBAL_BATCH, "--trainer.callbacks+=probes.RankReport",
                              CODETUNE_INJECT_OOM="2@1")
    assert "[rank: 1] codetune: out of device memory at step 2 with micro-batch 2" in result.stderr
    assert "[rank: 0] codetune: out of device memory" not in result.stderr  # rank 0 only followed the vote
    assert [r["micro_batch_size"] for r in rank_reports(run_dir)] == [1, 1], "the back-off applied on both ranks"
    assert [r["micro_batch_size"] for r in rank_reports(two_ranks)] == [2, 2]
    assert_same_adapter(run_dir, two_ranks)
    assert rank_reports(run_dir)[0] == pytest.approx(rank_reports(run_dir)[1], rel=1e-9)

    training = training_stats(run_dir)  # written by rank 0 alone
    assert [(e["step"], e["micro_batch_size"], e["reason"]) for e in training["oom_backoffs"]] == [(2, 1, "oom")]
    assert training["training_stats"]["final_train_loss"] == pytest.approx(
        training_stats(two_ranks)["training_stats"]["final_train_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_resume_under_ddp_gives_every_rank_its_own_random_generators_back(two_ranks):
    # The ranks' generators differ (RankSeededDraws), so restoring one rank's state everywhere would show.
    saved = torch.load(two_ranks / f"step{RESUME_AT}.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == RESUME_AT
    _, run_dir = run_ddp(two_ranks.parents[1], "resumed", *GLOBAL_BATCH, *PROBES,
                         "--ckpt_path", str(two_ranks / f"step{RESUME_AT}.ckpt"))
    full, resumed = ([rank_draws(d, rank) for rank in (0, 1)] for d in (two_ranks, run_dir))
    assert full[0][4] != full[1][4], "the ranks' streams differ"
    for rank in (0, 1):
        assert sorted(resumed[rank]) == [4], resumed[rank]
        assert resumed[rank][4] == full[rank][4], f"rank {rank} drew another stream after the resume"
    assert_same_adapter(run_dir, two_ranks)


@pytest.mark.slow
def test_every_rank_trains_at_the_plan_of_the_smallest_free_memory(tmp_path):
    """Emulated cards (probes.EmulatedCard): rank 0's has room for the whole batch of 6 without checkpointing, rank
    1's only for micro-batch 1 with it. `--data.batch_size auto` and `--model.gradient_checkpointing auto` are decided
    once for all ranks, for the smallest free memory: both ranks train at rank 1's plan, which rank 0's card fits."""
    from transformers import AutoConfig

    from codetune.memory.search import largest_fitting
    from codetune.memory.shapes import DEFAULT_LORA_TARGETS, ModelShape, training_shape_for
    from codetune.memory.units import GiB

    card = json.dumps({"class_path": "probes.EmulatedCard",
                       "init_args": {"micro_batch": [6, 1], "checkpointing": [False, True]}})
    result, run_dir = run_ddp(tmp_path, "cards", "--data.seq_len", "96", "--data.fim_rate", "0", "--generation.base_eval",
                         "false", "--data.batch_size", "auto", "--data.effective_batch_size", "6",
                         "--model.gradient_checkpointing", "auto", "--trainer.max_steps", "1",
                         f"--trainer.callbacks+={card}")
    reports = [json.loads((run_dir / f"card_rank{rank}.json").read_text()) for rank in (0, 1)]
    # The tests' preset settings as fit resolves them on the CPU (fp32, unquantized, AdamW), planned for CUDA.
    shape = ModelShape.from_config(AutoConfig.from_pretrained(run_dir / "base_model"))
    training = training_shape_for(
        seq_len=96, micro_batch_size=1, quantized_4bit=False, compute_dtype_bytes=4, lora_rank=8,
        lora_target_modules=DEFAULT_LORA_TARGETS, lora_dropout=0.0, modules_to_save=("embed_tokens", "lm_head"),
        optimizer="adamw", gradient_checkpointing=False, loss_chunk_size=1024, attn_implementation="sdpa",
        packing="isolated", device="cuda")

    def choice(free: int) -> tuple[int, bool]:
        picked = largest_fitting(6, free, shape, training, True, after_load=True)
        return picked.micro_batch_size, picked.plan.training.gradient_checkpointing

    assert [choice(r["free"]) for r in reports] == [(6, False), (1, True)], "each card alone decides otherwise"
    smallest = min(r["free"] for r in reports)
    micro, checkpointing = choice(smallest)
    trained = [(r["micro_batch_at_start"], r["micro_batch_at_end"], r["checkpointing"]) for r in reports]
    assert trained == [(micro, micro, checkpointing)] * 2, f"ranks trained at (start, end, checkpointing) {trained}"
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["status"] == "completed"
    plan = manifest["phase_results"]["phase_3_model"]["vram_plan"]
    assert (plan["free_gib"], plan["micro_batch_size"], plan["gradient_checkpointing"]) == (
        round(smallest / GiB, 3), micro, checkpointing)
    assert reports[1]["vram_plan"] == plan, "rank 1 planned with the same figures"
    assert "the memory plan is made for the smallest free memory of the 2 ranks' cards" in result.stdout + result.stderr
