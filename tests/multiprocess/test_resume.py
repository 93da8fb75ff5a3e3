"""Exact resume: a run SIGKILLed mid-epoch, or stopped by Ctrl-C or SIGTERM, and resumed ends with the adapter of
an uninterrupted run; a 'tiny' run resumed after its repository changed keeps the tokenizer it was started with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from helpers import assert_same_adapter, fit_command, subprocess_env

EPOCHS = 3  # 14 windows of 64 tokens, optimizer batches of 4: 4 steps per epoch, 12 in all
EVERY = 3  # checkpoints at steps 3, 6, 9 (and at each epoch end: 4, 8)
# Dropout on (the default is off) so that the random generators matter and RandomState is tested.
DROPOUT = ("--model.lora_dropout", "0.05")
KILL_BEFORE = 7  # blocked before step 8, in epoch 1: the last checkpoint is step 6, mid-epoch


def train(repo: Path, runs: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = fit_command(repo, runs, name, "--trainer.max_epochs", str(EPOCHS), "--checkpoint_every_n_steps",
                      str(EVERY), "--trainer.callbacks+=probes.SampleLog", *DROPOUT, *extra)
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def train_and_kill(repo: Path, runs: Path, name: str, *extra: str) -> None:
    """A real SIGKILL of every training process, while they wait before step KILL_BEFORE + 1."""
    block = json.dumps({"class_path": "probes.BlockAtStep", "init_args": {"step": KILL_BEFORE}})
    cmd = fit_command(repo, runs, name, "--trainer.max_epochs", str(EPOCHS), "--checkpoint_every_n_steps",
                      str(EVERY), "--trainer.callbacks+=probes.SampleLog", f"--trainer.callbacks+={block}", *DROPOUT,
                      *extra)
    # Its own session: under DDP, Lightning's launcher starts the other ranks as children; all die together.
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    marker = runs / name / "blocked"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.2)
    time.sleep(1)  # every rank reaches the block (they move in lockstep: each step ends with a collective)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def samples(run_dir: Path) -> dict[tuple[int, int], list[int]]:
    """Sample ids trained at each (rank, optimizer step); the last record wins: a redone step replaces it."""
    return {(int(path.stem[-1]), step): ids for path in sorted(run_dir.glob("samples_rank*.jsonl"))
            for _, step, ids in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "ddp-2-ranks"])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(fixture_repo, tmp_path, ranks):
    runs = tmp_path / "runs"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "1") if ranks == 2 else ()
    full = train(fixture_repo, runs, "full", *ddp)
    assert full.returncode == 0, full.stderr[-3000:]

    train_and_kill(fixture_repo, runs, "killed", *ddp)
    killed_dir = runs / "killed"
    assert not (killed_dir / "adapter").exists()
    ckpt = torch.load(killed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["CodeDataModule"]["steps_done"] == 2, "a mid-epoch checkpoint"
    interrupted = json.loads((killed_dir / "MANIFEST.json").read_text())
    assert interrupted["status"] == "running" and interrupted["segments"][0]["end_step"] == 6

    base_samples = (killed_dir / "samples" / "base.jsonl").stat().st_mtime_ns

    # Exactly what `make resume RUN=runs/killed` runs.
    resumed = subprocess.run(fit_command_resume(killed_dir), env=subprocess_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr
    assert (f"codetune: {killed_dir} was killed while it trained (its manifest still said running); resuming from "
            f"its last checkpoint, checkpoints/last.ckpt (step 6).") in resumed.stderr

    # The same windows at every step (each once per epoch), and the same final weights.
    assert samples(killed_dir) == samples(runs / "full")
    adapter = assert_same_adapter(killed_dir, runs / "full")
    # ... which moved well away from the checkpoint resumed from: the resumed steps did train.
    at_checkpoint = {adapter_key(k): v for k, v in ckpt["state_dict"].items()}
    assert max(float((v - at_checkpoint[k]).abs().max()) for k, v in adapter.items()) > 1e-3

    manifest = json.loads((killed_dir / "MANIFEST.json").read_text())
    first, second = manifest["segments"]
    assert first["status"] == "interrupted" and (first["start_step"], first["end_step"]) == (0, 6)
    assert second["status"] == "completed" and (second["start_step"], second["end_step"]) == (6, 12)
    assert second["resumed_from"].endswith("last.ckpt")
    assert manifest["status"] == "completed"
    assert manifest["training_time_minutes"] == pytest.approx(first["training_minutes"] + second["training_minutes"],
                                                              abs=1e-3)
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    reference_stats = json.loads((runs / "full" / "MANIFEST.json").read_text())["phase_results"][
        "phase_4_training"]["training_stats"]
    assert stats["optimizer_steps"] == 12
    assert stats["tokens_trained"] == reference_stats["tokens_trained"]
    assert stats["final_val_loss"] == pytest.approx(reference_stats["final_val_loss"], rel=1e-5)
    # The eval history came back from the checkpoint: the base model was not evaluated again.
    assert (killed_dir / "samples" / "base.jsonl").stat().st_mtime_ns == base_samples
    evaluation = manifest["phase_results"]["phase_5_evaluation"]
    assert evaluation["base"] == json.loads((runs / "full" / "MANIFEST.json").read_text())["phase_results"][
        "phase_5_evaluation"]["base"]
    assert [e["epoch"] for e in evaluation["epochs"]] == list(range(EPOCHS))


def fit_command_resume(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "codetune", "fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last"]


def adapter_key(checkpoint_key: str) -> str:
    """The adapter file's name for a trainable weight in the checkpoint's state_dict."""
    return checkpoint_key.removeprefix("model.").replace(".modules_to_save", "").replace(".default", "")


MID_EPOCH = 5  # the signal lands before step 6 (epoch 1 runs steps 5 to 8): a mid-epoch stop
LAST_OF_EPOCH = 7  # before step 8, the last of epoch 1: the resume starts at epoch 2 and must evaluate epoch 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run, without periodic checkpoints, that each signal's run is compared with."""
    from helpers import write_fixture_repo

    tmp = tmp_path_factory.mktemp("signals")
    repo = write_fixture_repo(tmp / "repo")
    full = train(repo, tmp / "runs", "full", "--checkpoint_every_n_steps", "0")
    assert full.returncode == 0, full.stderr[-3000:]
    return repo, tmp / "runs"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "pause_at"), [
    (signal.SIGINT, MID_EPOCH), (signal.SIGTERM, MID_EPOCH), (signal.SIGINT, LAST_OF_EPOCH),
], ids=["ctrl-c", "sigterm", "ctrl-c-at-the-epochs-last-step"])
def test_a_signal_checkpoints_at_the_next_step_and_the_printed_command_resumes_exactly(uninterrupted, signum,
                                                                                        pause_at):
    repo, runs = uninterrupted
    name = f"{signum.name.lower()}-{pause_at}"
    pause = json.dumps({"class_path": "probes.PauseUntilSignalled", "init_args": {"step": pause_at}})
    # No periodic checkpoint: whatever the resume starts from, the interrupt wrote.
    cmd = fit_command(repo, runs, name, "--trainer.max_epochs", str(EPOCHS), "--checkpoint_every_n_steps", "0",
                      "--trainer.callbacks+=probes.SampleLog", f"--trainer.callbacks+={pause}", *DROPOUT)
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = runs / name
    deadline = time.monotonic() + 300
    while not (run_dir / "paused").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.1)
    proc.send_signal(signum)
    (run_dir / "signalled").write_text(signum.name)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]  # 130 for SIGINT, 143 for SIGTERM

    stopped_at = pause_at + 1
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == stopped_at
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["status"] == "interrupted" and not (run_dir / "adapter").exists()
    (segment,) = manifest["segments"]
    assert (segment["status"], segment["start_step"], segment["end_step"]) == ("interrupted", 0, stopped_at)
    training = manifest["phase_results"]["phase_4_training"]
    assert training["status"] == "interrupted" and "error" not in training
    assert training["interrupted"].startswith(f"{signum.name} during training at step {stopped_at}: checkpoint ")
    # The epoch of the stop (epoch 1) was not evaluated: only the base's and epoch 0's evals ran. (Stopped after
    # epoch 1's last step, the resume continues at epoch 2 and evaluates epoch 1 first: asserted below.)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["base.jsonl", "epoch_0.jsonl"]
    command = f"codetune fit --config {run_dir / 'config.yaml'} --ckpt_path last"
    (line,) = [line for line in err.splitlines() if line.startswith(f"codetune: {signum.name} during")]
    assert line.startswith(f"codetune: {signum.name} during training, at step {stopped_at}: kept ")
    assert line.endswith(f"Continue with: {command}"), err[-2000:]

    # The printed command, as `python -m codetune`.
    resumed = subprocess.run([sys.executable, "-m", *command.split()], env=subprocess_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    first, second = manifest["segments"]
    assert first["status"] == "interrupted" and (second["start_step"], second["end_step"]) == (stopped_at, 12)
    assert manifest["status"] == "completed"
    assert samples(run_dir) == samples(runs / "full")
    assert_same_adapter(run_dir, runs / "full")
    assert [e["epoch"] for e in manifest["phase_results"]["phase_5_evaluation"]["epochs"]] == list(range(EPOCHS))


# A fit as short as a fit gets: one window of 64 tokens per optimizer step, no validation, no generation eval.
# A vocabulary the fixture repository fills (as a real repository fills 2048): a retrained tokenizer has the same
# size, so the model's config and weights are the same too, and only the vocabulary can tell the two apart.
TINY_VOCAB = 320
QUICK = ("--data.tiny_vocab_size", str(TINY_VOCAB), "--data.batch_size", "1",
         "--data.gradient_accumulation_steps", "1", "--trainer.limit_val_batches", "0",
         "--generation.base_eval", "false", "--generation.repo_prompts", "0", "--generation.fim_prompts", "0",
         "--generation.prompts", "[]", "--trainer.callbacks+=probes.VocabularyLog")


def change_repository(repo: Path) -> None:
    """New files full of words the first tokenizer never saw, and an edited one: a tokenizer trained now differs."""
    for i in range(4):
        (repo / "py" / f"quokka_{i}.py").write_text(
            "".join(f"def zebra_quokka_{i}_{j}(platypus_wombat):\n    return platypus_wombat * {j}\n\n"
                    for j in range(8)))
    lib = repo / "src" / "nested" / "lib.rs"
    lib.write_text(lib.read_text().replace("answer", "narwhal_axolotl"))


def saved_vocabulary(run_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(run_dir / "base_model" / "tokenizer.json")).get_vocab(with_added_tokens=True)


@pytest.mark.slow
def test_a_tiny_run_resumed_after_its_repository_changed_keeps_the_tokenizer_it_saved(tmp_path, capsys):
    from helpers import write_fixture_repo
    from helpers import fit_args

    from codetune.__main__ import main
    from codetune.data.datamodule import CodeDataModule

    repo, runs = write_fixture_repo(tmp_path / "repo"), tmp_path / "runs"
    assert main(fit_args(repo, runs, "run", *QUICK, "--trainer.max_steps", "1")) == 0
    run_dir = runs / "run"
    saved = saved_vocabulary(run_dir)
    assert json.loads((run_dir / "vocabulary_fresh.json").read_text()) == saved and len(saved) == TINY_VOCAB

    change_repository(repo)
    # What the data module trains outside a run directory now: another vocabulary, so the two can be told apart.
    retrained = CodeDataModule(str(repo), seq_len=64, cache_dir=None, fim_rate=0, tiny_vocab_size=TINY_VOCAB)
    retrained.setup("fit")
    assert retrained.tokenizer.get_vocab() != saved and len(retrained.tokenizer) == TINY_VOCAB

    # Resumed in its own directory: the saved tokenizer, and the run goes on from step 1.
    assert main(fit_args(repo, runs, "run", *QUICK, "--trainer.max_steps", "2", "--ckpt_path", "last")) == 0
    assert json.loads((run_dir / "vocabulary_resumed.json").read_text()) == saved
    assert saved_vocabulary(run_dir) == saved
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert [(s["start_step"], s["end_step"], s["status"]) for s in manifest["segments"]] == [
        (0, 1, "completed"), (1, 2, "completed")]
    assert manifest["phase_results"]["phase_1_scan"]["files_kept"] == 17, "the resumed run read the changed repository"

    # Resumed into another run directory: that one trains a new tokenizer (and builds the same base model from it),
    # which the checkpoint refuses.
    elsewhere = fit_args(repo, runs, "elsewhere", *QUICK, "--trainer.max_steps", "3",
                         "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    capsys.readouterr()
    assert main(elsewhere) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path: the checkpoint was trained with another vocabulary than this run's tokenizer" in err, err
    assert "resume in the run directory the checkpoint came from" in err and not (runs / "elsewhere").exists()


class FakeTrainer:
    """What `CodeDataModule.setup` reads of the trainer it is attached to: the run directory, the rank, and a
    strategy whose broadcast hands every rank what rank zero sent (`from_rank_zero`)."""

    def __init__(self, run_dir: Path, rank: int, from_rank_zero: str | None = None) -> None:
        self.default_root_dir = str(run_dir)
        self.is_global_zero = rank == 0
        self.strategy = self
        self.from_rank_zero = from_rank_zero

    def broadcast(self, obj, src: int = 0):
        return obj if self.is_global_zero else self.from_rank_zero


def data_module_on(repo: Path, trainer: FakeTrainer):
    from codetune.data.datamodule import CodeDataModule

    data = CodeDataModule(str(repo), seq_len=64, cache_dir=None, fim_rate=0)
    data.trainer = trainer
    data.setup("fit")
    return data


def test_every_rank_of_a_fresh_tiny_run_tokenizes_with_rank_zeros_tokenizer(fixture_repo, tmp_path):
    from codetune.data.tokenizer import train_tokenizer

    rank_zeros = train_tokenizer(["fn rank_zero_only() {}\n" * 20], vocab_size=300)
    data = data_module_on(fixture_repo, FakeTrainer(tmp_path / "run", 1, rank_zeros.backend_tokenizer.to_str()))
    assert data.tokenizer.get_vocab() == rank_zeros.get_vocab()
    assert data.tokenizer.eos_token_id == rank_zeros.eos_token_id and data.fim_tokens is not None


def test_a_tiny_run_directory_with_a_broken_saved_tokenizer_is_refused(fixture_repo, tmp_path):
    from codetune.errors import ConfigError

    base = tmp_path / "run" / "base_model"
    base.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"has no tokenizer.json\. A new tokenizer is not trained in its place"):
        data_module_on(fixture_repo, FakeTrainer(tmp_path / "run", 0))
    (base / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"its tokenizer.json cannot be parsed .*Restore .*base_model as the run"):
        data_module_on(fixture_repo, FakeTrainer(tmp_path / "run", 0))
