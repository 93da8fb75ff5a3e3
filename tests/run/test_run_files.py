"""The run directory helpers: atomic writes, the manifest's phases, the trained repository's commit."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from codetune.storage import atomic_save_dir, atomic_write_text
from codetune.run.manifest import Manifest, git_commit


def test_git_commit_of_a_repository_and_none_elsewhere(tmp_path):
    assert git_commit(tmp_path) is None
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.py"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "a"], check=True, env={**os.environ, **env})
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(tmp_path) == head.strip() and len(head.strip()) == 40


def test_manifest_phases_are_written_through_and_reloaded(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.start_phase("phase_4_training")
    on_disk = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert on_disk["phase_results"]["phase_4_training"]["status"] == "running"
    manifest.finish_phase("phase_4_training", {"training_stats": {"final_train_loss": 1.5}})
    manifest.update(training_time_minutes=0.5)
    reloaded = Manifest(tmp_path).data
    assert reloaded["phase_results"]["phase_4_training"]["training_stats"] == {"final_train_loss": 1.5}
    assert reloaded["phase_results"]["phase_4_training"]["status"] == "completed"
    assert reloaded["training_time_minutes"] == 0.5


def test_a_failed_phase_names_the_error(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.start_phase("phase_2_tokenize")
    manifest.fail_running_phases(ValueError("bad window"))
    data = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert data["status"] == "failed" and data["failed_phase"] == "phase_2_tokenize"
    assert data["phase_results"]["phase_2_tokenize"]["error"] == "ValueError: bad window"


def test_atomic_writes_leave_the_old_file_or_directory_whole_on_failure(tmp_path):
    target = tmp_path / "MANIFEST.json"
    atomic_write_text(target, "old")
    adapter = tmp_path / "adapter"
    with atomic_save_dir(adapter) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_save_dir(adapter) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while saving")
    assert (adapter / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json", "adapter"], "no temporary left behind"
    with atomic_save_dir(adapter) as tmp:
        (tmp / "weights").write_text("v2")
    assert (adapter / "weights").read_text() == "v2" and target.read_text() == "old"


def test_a_failed_save_removes_the_folders_it_made_for_the_target_and_no_others(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with atomic_save_dir(tmp_path / "runs" / "r" / "export" / "gguf" / "out") as tmp:
            (tmp / "adapter.gguf").write_text("half")
            raise RuntimeError("refused")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["runs", "runs/r"]


def test_run_files_get_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "MANIFEST.json", "{}")
        with atomic_save_dir(tmp_path / "adapter") as tmp:
            fd = os.open(tmp / "weights.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes
            os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "MANIFEST.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter" / "weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_segments_a_killed_one_becomes_interrupted_and_times_add_up(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.start_segment(resumed_from=None)
    manifest.update_segment(start_step=0, end_step=6, training_minutes=1.5)  # then SIGKILL: no more writes
    resumed = Manifest(tmp_path)
    resumed.start_segment(resumed_from="runs/x/checkpoints/last.ckpt")
    resumed.update_segment(start_step=6, end_step=12, training_minutes=1.25)
    data = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert [s["status"] for s in data["segments"]] == ["interrupted", "running"]
    assert data["segments"][1]["resumed_from"] == "runs/x/checkpoints/last.ckpt"
    assert data["training_time_minutes"] == 2.75
    # Training from scratch in the same directory: the earlier segments were another run's.
    Manifest(tmp_path).start_segment(resumed_from=None)
    assert [s["segment"] for s in json.loads((tmp_path / "MANIFEST.json").read_text())["segments"]] == [1]


def test_an_interrupted_run_is_not_a_failed_one(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.start_segment(resumed_from=None)
    manifest.update_segment(start_step=0, end_step=14, training_minutes=0.5)
    manifest.start_phase("phase_4_training")
    manifest.interrupt_running_phases("SIGINT at step 14: checkpoint runs/x/checkpoints/last.ckpt",
                                      wall_s={"phase_4_training": 30.0})
    data = json.loads((tmp_path / "MANIFEST.json").read_text())
    phase = data["phase_results"]["phase_4_training"]
    assert (phase["status"], phase["wall_s"]) == ("interrupted", 30.0) and "error" not in phase
    assert phase["interrupted"] == "SIGINT at step 14: checkpoint runs/x/checkpoints/last.ckpt"
    assert (data["status"], data["interrupted_phase"]) == ("interrupted", "phase_4_training")
    assert "failed_phase" not in data and "error" not in data
    segment = data["segments"][0]
    assert (segment["status"], segment["end_step"]) == ("interrupted", 14) and segment["finished_at"]
