"""One owner per run directory: the lock and who holds it, a killed run told from a running one, which run a
`--ckpt_path` resumes, and a taken name refused."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codetune.errors import ConfigError
from codetune.run.directory import (RunInUseError, acquire, check_new_run_dir, clear_run, live_status, open_run_dir,
                                    resume_checkpoint, resumed_run_dir)

HOLD = "import sys, time; from pathlib import Path; from codetune.run.directory import acquire; " \
       "acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder_then_the_kernel_frees_a_killed_one(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "MANIFEST.json").write_text(json.dumps({"status": "running"}))
    holder = hold_in_another_process(run)
    try:
        started = time.monotonic()
        with pytest.raises(RunInUseError) as refused:
            acquire(run)
        assert time.monotonic() - started < 5
        assert f"process {holder.pid} on {socket.gethostname()}" in str(refused.value)
        assert live_status(run, {"status": "running"}) == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the manifest saying running; nobody holds the run: it was killed.
    assert live_status(run, {"status": "running"}) == "killed"
    assert live_status(run, {"status": "completed"}) == "completed"
    acquire(run).release()


def test_a_taken_name_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "runs" / "a"
    check_new_run_dir(run, overwrite=False)  # not there: fine
    run.mkdir(parents=True)
    check_new_run_dir(run, overwrite=False)  # empty: fine
    (run / "MANIFEST.json").write_text(json.dumps({"status": "completed", "phase_results": {
        "phase_4_training": {"training_stats": {"optimizer_steps": 12}}}}))
    with pytest.raises(ConfigError) as refused:
        check_new_run_dir(run, overwrite=False)
    message = str(refused.value)
    assert message.startswith(f"--run_name a: {run} already holds a run (completed, 12 steps).")
    assert f"codetune fit --config {run / 'config.yaml'} --ckpt_path last" in message
    assert "--overwrite_run true" in message
    check_new_run_dir(run, overwrite=True)


def test_overwriting_removes_what_a_run_wrote_and_keeps_the_users_files(tmp_path):
    run = tmp_path / "a"
    for name in ("checkpoints/last.ckpt", "adapter/adapter_model.safetensors", "tensorboard/events", "notes.md"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "MANIFEST.json").write_text("{}")
    lock, created = open_run_dir(run, resuming=False, overwrite=True)
    lock.release()
    assert not created and sorted(p.name for p in run.iterdir()) == [".lock", "notes.md"]


def test_two_processes_creating_one_run_directory_one_is_refused(tmp_path):
    run = tmp_path / "runs" / "same"
    first, created = open_run_dir(run, resuming=False, overwrite=False)
    assert created
    (run / "MANIFEST.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(RunInUseError):  # the second one, while the first holds it
        open_run_dir(run, resuming=False, overwrite=False)
    first.release()


def test_the_resumed_run_is_the_one_whose_config_is_given_wherever_it_moved(tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    moved.mkdir(parents=True)
    (moved / "MANIFEST.json").write_text("{}")
    (moved / "config.yaml").write_text("{}")
    given = [str(tmp_path / "base.yaml"), str(moved / "config.yaml")]
    assert resumed_run_dir("last", None, "runs", given) == moved.resolve()
    # The config's own run wins over a name a config holds (an older config.yaml names the run it was written in),
    # not over one typed on the command line.
    assert resumed_run_dir("last", "named", str(tmp_path / "runs"), given) == moved.resolve()
    assert resumed_run_dir("last", "named", str(tmp_path / "runs"), given, run_name_typed=True) == \
        tmp_path / "runs" / "named"
    assert resumed_run_dir("last", "named", str(tmp_path / "runs"), given[:1]) == tmp_path / "runs" / "named"
    assert resumed_run_dir(None, None, "runs", given) is None  # not resuming
    (moved / "checkpoints").mkdir()
    (moved / "checkpoints" / "last.ckpt").write_text("x")
    assert resumed_run_dir(str(moved / "checkpoints" / "last.ckpt"), None, "runs", []) == moved.resolve()
    with pytest.raises(ConfigError, match="which run does it resume"):
        resumed_run_dir("last", None, "runs", [str(tmp_path / "base.yaml")])


def test_last_of_a_run_that_never_checkpointed_starts_it_again_in_its_own_directory(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(ConfigError, match="does not exist, so there is nothing to resume"):
        resume_checkpoint("last", run)
    run.mkdir()
    with pytest.raises(ConfigError, match="holds no codetune run"):
        resume_checkpoint("last", run)
    (run / "MANIFEST.json").write_text(json.dumps({"status": "interrupted"}))
    assert resume_checkpoint("last", run) is None
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_text("x")
    assert resume_checkpoint("last", run) == (run / "checkpoints" / "last.ckpt").resolve()
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        resume_checkpoint(str(tmp_path / "nowhere.ckpt"), run)


def test_clear_run_leaves_an_empty_run_directory_empty(tmp_path):
    clear_run(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_commands_that_read_a_killed_run_say_it_was_killed(tmp_path, capsys):
    from codetune.commands.compare import main as compare
    from codetune.run.finished import load_run_config

    run = tmp_path / "killed"
    run.mkdir()
    (run / "MANIFEST.json").write_text(json.dumps({"status": "running", "phase_results": {}}))
    (run / "config.yaml").write_text("model: {name_or_path: tiny, quantization: none, dtype: float32, "
                                     "trust_remote_code: false, attn_implementation: sdpa}\n")
    with pytest.raises(ConfigError) as refused:
        load_run_config(run)
    assert "it was killed while training" in str(refused.value)
    assert f"codetune fit --config {run / 'config.yaml'} --ckpt_path last" in str(refused.value)
    assert compare([str(run), str(run / "MANIFEST.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["status"] == "killed"

    holder = hold_in_another_process(run)
    try:
        with pytest.raises(ConfigError, match=f"it is still training \\(process {holder.pid} on "):
            load_run_config(run)
    finally:
        holder.kill()
        holder.wait()
