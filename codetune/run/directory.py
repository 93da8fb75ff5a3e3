"""Who owns a run directory: one run, and while it trains, one process.

A run directory is created once, by the run that names it. While a process trains in it, that process holds an
exclusive lock on its `.lock` file (``fcntl.flock``), which also records the holder's pid, host and start time; a
second process is refused at once, with those. The kernel drops the lock when its process ends in any way,
``kill -9`` and a power cut included, so a manifest still saying ``running`` with no holder is a run that was
killed (`live_status`). The lock works wherever ``flock`` does: local disks and NFS (Linux emulates it there with
POSIX locks); on a file system without it, the directory is refused rather than left unguarded.

An existing run directory is reused only when the user says so: `--ckpt_path` resumes the run in it (the one
implicit reuse), and `--overwrite_run true` replaces it with a new run. Every path a run records is relative to
its directory, so a run moved, renamed or copied to another machine resumes there: a run is found from the
`--config RUN/config.yaml` it is resumed with, not from where it was when it started.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetune.errors import ConfigError
from codetune.storage import ADAPTER_DIR, BASE_MODEL_DIR, CONFIG_NAME, MANIFEST_NAME, utc_now
from codetune.run.manifest import Manifest, resume_command

LOCK_NAME = ".lock"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
TENSORBOARD_DIR = "tensorboard"
# What a run writes in its directory: `--overwrite_run` removes these, and nothing else the user may keep there.
RUN_ENTRIES = (MANIFEST_NAME, CONFIG_NAME, CHECKPOINTS_DIR, TENSORBOARD_DIR, ADAPTER_DIR, BASE_MODEL_DIR, "samples",
               "export")
# A process may find a run locked for an instant by another one that only looked (a `compare`, a refused second
# run): it waits this long before calling the directory taken.
LOCK_WAIT_S = 1.0


class RunInUseError(ConfigError):
    """Another live process holds the run directory's lock."""


@dataclass
class RunLock:
    """The held lock of one run directory; `release` (or the process's end) frees it."""

    run_dir: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def acquire(run_dir: Path, wait_s: float = LOCK_WAIT_S) -> RunLock:
    """The lock of `run_dir` (which exists), recording this process as the holder; RunInUseError naming the holder
    when a live process has it."""
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise ConfigError(f"{run_dir}: cannot lock {path} ({err.strerror}): put --runs_dir on a file "
                                  f"system that supports file locks (a local disk or NFS).") from None
            if time.monotonic() >= deadline:
                holder = read_holder(run_dir)
                os.close(fd)
                raise RunInUseError(in_use_message(run_dir, holder)) from None
            time.sleep(0.05)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return RunLock(run_dir, fd)


def read_holder(run_dir: Path) -> dict[str, Any]:
    """Who last locked `run_dir` ({} when unknown)."""
    try:
        return json.loads((run_dir / LOCK_NAME).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def in_use_message(run_dir: Path, holder: dict[str, Any]) -> str:
    who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started_at')})" if holder
           else "another process")
    return (f"{run_dir} is in use: {who} is training in it. Wait for it to finish or stop it (Ctrl-C, or "
            f"`kill {holder.get('pid', '<pid>')}` on {holder.get('host', 'its host')}: it checkpoints and stops), "
            f"or give this run another --run_name.")


def held(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir`'s lock (looked at without taking it for longer than an instant)."""
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def live_status(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The run's status as it is now: a manifest's `running` is `killed` when no process holds the run."""
    status = manifest.get("status") or "unknown"
    return "killed" if status == "running" and not held(run_dir) else status


# -- choosing and opening the run directory ----------------------------------------------------------------


def resumed_run_dir(ckpt_path: str | None, run_name: str | None, runs_dir: str, configs: list[str],
                    run_name_typed: bool = False) -> Path | None:
    """The run a `--ckpt_path` resumes: `--runs_dir`/`--run_name` when the name was typed on the command line (a
    checkpoint file may start a new run there), else the run directory whose config.yaml was given with `--config`
    (the last one; wherever it was moved, and whatever run name an older config.yaml still holds), else the name
    a config holds, else the run that holds the checkpoint file. None when not resuming."""
    if ckpt_path is None:
        return None
    if run_name and run_name_typed:
        return Path(runs_dir).expanduser() / run_name
    for config in reversed(configs):
        directory = Path(config).expanduser().resolve().parent
        if (directory / MANIFEST_NAME).is_file():
            return directory
    if run_name:
        return Path(runs_dir).expanduser() / run_name
    checkpoint = Path(ckpt_path).expanduser()
    if checkpoint.is_file() and checkpoint.resolve().parent.name == CHECKPOINTS_DIR:
        directory = checkpoint.resolve().parent.parent
        if (directory / MANIFEST_NAME).is_file():
            return directory
    raise ConfigError(f"--ckpt_path {ckpt_path}: which run does it resume? Give the run's config, "
                      f"`--config runs/<name>/config.yaml` (or `make resume RUN=runs/<name>`), or its --run_name.")


def resume_checkpoint(ckpt_path: str, run_dir: Path) -> Path | None:
    """The checkpoint file `--ckpt_path` names in `run_dir`: None for `last` of a run that never checkpointed
    (it trains from its start again, in its own directory); a ConfigError when there is nothing to resume."""
    if ckpt_path != "last":
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file (give a .ckpt file, or `last` for "
                              f"the run's {run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT}).")
        return path.resolve()
    last = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if last.is_file():
        return last.resolve()
    if not (run_dir / MANIFEST_NAME).is_file():
        what = "does not exist" if not run_dir.exists() else "holds no codetune run (no MANIFEST.json)"
        raise ConfigError(f"--ckpt_path last: {run_dir} {what}, so there is nothing to resume. Give the run's "
                          f"config (--config runs/<name>/config.yaml), or start a new run without --ckpt_path.")
    return None


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is built, a run directory that already holds a run (or anything else) when the
    user neither resumes it nor asks to overwrite it."""
    if overwrite or not run_dir.exists() or (run_dir.is_dir() and not _holds_anything(run_dir)):
        return
    if not run_dir.is_dir():
        raise ConfigError(f"--run_name {run_dir.name}: {run_dir} is a file. Give another --run_name or --runs_dir.")
    if held(run_dir):
        raise RunInUseError(in_use_message(run_dir, read_holder(run_dir)))
    raise ConfigError(f"--run_name {run_dir.name}: {run_dir} already holds {_what_is_there(run_dir)}. Resume it "
                      f"with `{resume_command(run_dir)}`, give this run "
                      f"another --run_name, or pass --overwrite_run true to replace it.")


def _what_is_there(run_dir: Path) -> str:
    manifest = run_dir / MANIFEST_NAME
    if not manifest.is_file():
        return "files that are not a codetune run"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "a run whose MANIFEST.json cannot be read"
    steps = ((data.get("phase_results") or {}).get("phase_4_training") or {}).get("training_stats") or {}
    trained = f", {steps['optimizer_steps']} steps" if steps.get("optimizer_steps") is not None else ""
    return f"a run ({live_status(run_dir, data)}{trained})"


def open_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> tuple[RunLock, bool]:
    """Create (or, resuming or overwriting, reuse) `run_dir` and lock it; (the lock, whether it was created).
    Two processes creating the same directory at once: one creates it, the other is refused."""
    created = _create(run_dir)
    lock = acquire(run_dir, wait_s=LOCK_WAIT_S)
    if created or resuming:
        return lock, created
    if overwrite:
        clear_run(run_dir)
    elif _holds_anything(run_dir):  # filled since the check made before building, e.g. by a run started with it
        lock.release()
        raise ConfigError(f"--run_name {run_dir.name}: {run_dir} already holds {_what_is_there(run_dir)}; another "
                          f"run just started in it. Give this run another --run_name.")
    return lock, created


def _create(run_dir: Path) -> bool:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        return False
    return True


def _holds_anything(run_dir: Path) -> bool:
    return any(p.name != LOCK_NAME for p in run_dir.iterdir())


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote in `run_dir` (its manifest, config, checkpoints, logs, adapter, base model
    and exports), for `--overwrite_run`; anything else the user put there stays."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def remove_new_run(run_dir: Path, lock: RunLock) -> None:
    """Undo a run directory this process created, when bad input stopped the run before it trained."""
    lock.release()
    shutil.rmtree(run_dir, ignore_errors=True)


def relative_to_run(path: str | Path, run_dir: Path) -> str:
    """`path` as recorded in a run: relative to the run directory when inside it, else as it is (absolute)."""
    resolved, root = Path(path).resolve(), run_dir.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def say_if_killed(run_dir: Path) -> None:
    """One line when the run this process now holds was left `running` by a process that is gone (kill -9, a power
    cut): it resumes from its last whole checkpoint, which the manifest names."""
    if not (run_dir / MANIFEST_NAME).is_file():
        return
    manifest = Manifest(run_dir)
    if manifest.data.get("status") != "running":
        return
    last = manifest.last_checkpoint()
    kept = (f"its last checkpoint, {last['last_checkpoint']} (step {last['end_step']})" if last
            else "no checkpoint (it starts again from step 0)")
    print(f"codetune: {run_dir} was killed while it trained (its manifest still said running); resuming from "
          f"{kept}.", file=sys.stderr, flush=True)


def kept_and_continue(run_dir: Path) -> str:
    """What a run stopped by a full disk kept (its last whole checkpoint, as the manifest says) and the command
    that continues it once there is space."""
    last = Manifest(run_dir).last_checkpoint() if run_dir.is_dir() else None
    resume = resume_command(run_dir)
    if last is None:
        return f"No checkpoint was written; once there is space, start the run again with: {resume}"
    return (f"The last good checkpoint, {run_dir / last['last_checkpoint']} (step {last['end_step']}), is kept: once "
            f"there is space, continue with: {resume}")
