"""A run is never lost: a saved config re-runs as a new run, a moved run resumes, a taken name or a locked run is
refused, a signal in any phase leaves a whole manifest and a resumable run, a full disk keeps the last checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from codetune.callbacks.generation_eval import GenerationEval
from codetune.__main__ import main
from codetune.data.datamodule import CodeDataModule
from codetune.model.module import CodeLoRAModule
from helpers import fit_command, subprocess_env, write_fixture_repo
from helpers import fit_args
from helpers import assert_same_adapter

# 4 optimizer steps an epoch on the fixture repository; 5 steps: an epoch end (its evaluation) and a final
# validation of step 5. No generation prompts: the base and epoch evaluations are the held-out loss alone.
STEPS = 5
QUICK = ("--trainer.max_steps", str(STEPS), "--generation.repo_prompts", "0", "--generation.fim_prompts", "0",
         "--generation.prompts", "[]")


def fit(repo: Path, runs: Path, name: str, *extra: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(fit_args(repo, runs, name, *QUICK, *extra))


def resume(run_dir: Path, *extra: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last", *extra])


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "MANIFEST.json").read_text())


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run and the hash of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def half_written(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(repo, runs): the fixture repository and an uninterrupted run `runs/ref` of STEPS steps."""
    tmp = tmp_path_factory.mktemp("never-lost")
    repo = write_fixture_repo(tmp / "repo")
    assert fit(repo, tmp / "runs", "ref") == 0
    return repo, tmp / "runs"


def test_a_config_saved_in_a_run_re_runs_as_a_new_run_and_leaves_the_original_untouched(reference, capsys):
    repo, runs = reference
    before = snapshot(runs / "ref")
    config = runs / "ref" / "config.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(config), "--run_name", "c9", "--model.lora_rank", "4",
                     "--trainer.max_steps", "1"]) == 0
        assert main(["fit", "--config", str(config), "--trainer.max_steps", "1"]) == 0  # a new, timestamped run
    assert snapshot(runs / "ref") == before
    assert manifest(runs / "c9")["status"] == "completed"
    assert len([p for p in runs.iterdir() if p.name.startswith("run-")]) == 1
    saved = (runs / "c9" / "config.yaml").read_text()
    assert str(runs / "ref") not in saved and "run_name: null" in saved and "ckpt_path: null" in saved


def test_a_taken_name_is_refused_and_replaced_only_when_asked(reference, capsys):
    repo, runs = reference
    before = snapshot(runs / "ref")
    assert fit(repo, runs, "ref") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{runs / 'ref'} already holds a run (completed, {STEPS} steps)" in err
    assert snapshot(runs / "ref") == before

    shutil.copytree(runs / "ref", runs / "replaced")
    assert fit(repo, runs, "replaced", "--trainer.max_steps", "2", "--overwrite_run", "true") == 0
    (segment,) = manifest(runs / "replaced")["segments"]
    assert (segment["start_step"], segment["end_step"], segment["status"]) == (0, 2, "completed")


def test_a_run_that_would_train_nothing_is_refused_before_anything_is_written(reference, capsys):
    repo, runs = reference
    assert fit(repo, runs, "nothing", "--trainer.max_epochs", "0") == 2
    assert "--trainer.max_epochs 0 trains nothing" in capsys.readouterr().err
    assert not (runs / "nothing").exists()


def test_a_second_process_on_a_locked_run_is_refused_and_the_first_finishes_untouched(reference, capsys):
    repo, runs = reference
    cmd = fit_command(repo, runs, "locked", *QUICK, "--trainer.callbacks+=probes.WaitForFile")
    first = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = runs / "locked"
    deadline = time.monotonic() + 300
    while not (run_dir / "waiting").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    assert resume(run_dir) == 2  # a resume of the run being trained
    assert fit(repo, runs, "locked") == 2  # a new run of the same name
    for err in capsys.readouterr().err.splitlines():
        assert f"{run_dir} is in use: process {first.pid} on " in err
    (run_dir / "go").write_text("")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    data = manifest(run_dir)
    assert data["status"] == "completed" and len(data["segments"]) == 1


def send_sigterm_when(cls: type, name: str, condition=lambda *args: True):
    """`cls.name`, wrapped to SIGTERM this process when `condition(*args)` holds, then do its work."""
    original = getattr(cls, name)

    def wrapped(*args, **kwargs):
        if condition(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    return wrapped


def _step(module: CodeLoRAModule) -> int:
    return module.trainer.global_step


# Where the signal lands, what the manifest says was interrupted, and where the stop line says it stopped.
PHASES = {
    "scan": (CodeDataModule, "_scan", None, "phase_1_scan", "while scanning the repository"),
    "tokenize": (CodeDataModule, "_load_tokenizer", None, "phase_2_tokenize", "while tokenizing"),
    "model load": (CodeLoRAModule, "configure_model", None, "phase_3_model", "while loading the model"),
    "base eval": (CodeLoRAModule, "held_out_loss", lambda m: _step(m) == 0, "phase_4_training",
                  "during the base model's evaluation"),
    "training": (CodeLoRAModule, "training_step", lambda m, *a: _step(m) == 1, "phase_4_training",
                 "during training"),
    "validation": (CodeLoRAModule, "validation_step",
                   lambda m, *a: not m.trainer.sanity_checking and _step(m) == STEPS, "phase_4_training",
                   "during validation"),
    "epoch eval": (GenerationEval, "_evaluate_epoch", None, "phase_4_training", "during the epoch's evaluation"),
    "export": (CodeLoRAModule, "save_adapter", None, "phase_6_export",
               "while saving the final checkpoint and the adapter"),
}
# The step the kept checkpoint holds (None: no step was trained).
KEPT_STEP = {"training": 2, "validation": STEPS, "epoch eval": 4, "export": STEPS}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_any_phase_leaves_a_whole_manifest_and_a_moved_run_resumes_to_the_uninterrupted_adapter(
        reference, tmp_path, monkeypatch, capsys, phase):
    repo, runs = reference
    cls, name, condition, interrupted_phase, where = PHASES[phase]
    monkeypatch.setattr(cls, name, send_sigterm_when(cls, name, condition or (lambda *a: True)))
    run_dir = tmp_path / "runs" / "stopped"
    with pytest.raises(SystemExit) as stopped:
        fit(repo, tmp_path / "runs", "stopped")
    monkeypatch.undo()
    assert stopped.value.code == 143

    data = manifest(run_dir)
    assert data["status"] == "interrupted" and data["interrupted_phase"] == interrupted_phase
    assert data["phase_results"][interrupted_phase]["status"] == "interrupted"
    assert not half_written(run_dir) and not (run_dir / "adapter").exists()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("codetune: SIGTERM")]
    assert line.startswith(f"codetune: SIGTERM {where}")
    moved = tmp_path / "elsewhere" / "renamed"
    assert line.endswith(f"codetune fit --config {run_dir / 'config.yaml'} --ckpt_path last")
    kept = KEPT_STEP.get(phase)
    if kept is not None:
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == kept
        assert data["segments"][-1]["end_step"] == kept
        assert data["segments"][-1]["last_checkpoint"] == "checkpoints/last.ckpt"
    else:
        assert "no step was trained" in line and not (run_dir / "checkpoints").exists()

    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    assert resume(moved) == 0
    data = manifest(moved)
    assert data["status"] == "completed" and data["segments"][-1]["end_step"] == STEPS
    assert data["phase_results"]["phase_4_training"]["training_stats"]["final_val_loss"] is not None
    assert not (run_dir.exists()), "nothing is written at the run's old place"
    assert_same_adapter(moved, runs / "ref")


def can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or not can_mount_tmpfs(),
                    reason="needs a private tmpfs (unshare -Urm, mount)")
def test_a_full_disk_gives_one_message_a_true_manifest_and_a_resumable_last_checkpoint(reference, tmp_path):
    repo, runs = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    fill = json.dumps({"class_path": "probes.FillDiskAfter", "init_args": {"step": 4, "leave": 65536}})
    cmd = fit_command(repo, disk / "runs", "full", *QUICK, "--checkpoint_every_n_steps", "2",
                      "--data.cache_dir", str(tmp_path / "token-cache"), f"--trainer.callbacks+={fill}")
    # A private 64 MiB tmpfs over `disk`; the run directory is copied out before it goes away with the namespace.
    script = (f'mount -t tmpfs -o size=64m tmpfs "{disk}" && {" ".join(map(repr, cmd))}; rc=$?; '
              f'cp -a "{disk}/runs/full" "{tmp_path}/full"; exit $rc')
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("codetune fit: error:")]
    run_in_tmpfs = disk / "runs" / "full"
    assert error.startswith(f"codetune fit: error: no space left in {run_in_tmpfs / 'checkpoints'}: writing "
                            f"last.ckpt needs ")
    assert (f"The last good checkpoint, {run_in_tmpfs / 'checkpoints' / 'last.ckpt'} (step 2), is kept: once there "
            f"is space, continue with: codetune fit --config {run_in_tmpfs / 'config.yaml'} --ckpt_path last") in error

    run_dir = tmp_path / "full"
    data = manifest(run_dir)
    assert data["status"] == "interrupted" and "no space left" in data["interrupted"]
    segment = data["segments"][-1]
    assert (segment["end_step"], segment["last_checkpoint"]) == (2, "checkpoints/last.ckpt")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not half_written(run_dir)
    # On a disk with room (the run copied there): it resumes and ends as the uninterrupted run.
    assert resume(run_dir) == 0
    assert manifest(run_dir)["status"] == "completed"
    assert_same_adapter(run_dir, runs / "ref")


def test_a_copied_run_whose_config_names_the_original_resumes_in_the_copy_and_leaves_the_original(reference):
    """A config.yaml as codetune wrote it before runs named nothing of themselves: the run's name and absolute
    paths into it. Copied elsewhere and resumed, the copy trains and the original is not written to."""
    import yaml

    repo, runs = reference
    original = runs / "ref"
    copy = runs.parent / "copies" / "legacy"
    shutil.copytree(original, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["run_name"] = "ref"
    config["trainer"]["default_root_dir"] = str(original)
    config["trainer"]["logger"] = {"class_path": "codetune.run.tensorboard.EpochlessTensorBoardLogger", "init_args": {
        "save_dir": str(original), "name": "tensorboard", "version": "", "default_hp_metric": False}}
    config["checkpoint"]["dirpath"] = str(original / "checkpoints")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(original)
    assert resume(copy, "--trainer.max_steps", str(STEPS + 2)) == 0
    assert snapshot(original) == before
    data = manifest(copy)
    assert data["status"] == "completed" and data["segments"][-1]["end_step"] == STEPS + 2
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS + 2
