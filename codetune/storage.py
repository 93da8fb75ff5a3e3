"""Where codetune writes, and how: every file and folder it writes goes through here atomically (a temporary
sibling, then `os.replace`), so a crash never leaves half a manifest, half an adapter or half an output behind;
a full disk is one DiskFullError naming the folder and the space needed. Also the names of a run directory's
files, so that the scan and the commands reading a run need not import the code that writes them, and the
marker files by which a command recognises its own earlier output (`--out`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from codetune.errors import ConfigError, DiskFullError

MANIFEST_NAME = "MANIFEST.json"
# The other files and folders of a run directory, named here so that commands reading a finished run (`generate`,
# `merge`, `export`) need not import the training code that writes them.
CONFIG_NAME = "config.yaml"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
# The marker files of `codetune prepare --out` and `codetune merge --out` (their report, their source run): named
# here, with the manifest, so that the scan can tell codetune's outputs without importing those commands.
PREPARE_MARKER = "data_report.json"
MERGE_MARKER = "codetune_merge.json"
EXPORT_MARKER = "codetune_export.json"

def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, then rename it over `path`: readers see all of it or none. A full disk
    is a DiskFullError saying how much was needed and free; the old file is untouched."""
    with no_space_said(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        # os.open with 0o666 honours the umask (mkstemp's 0600 would make every run file private).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                # On disk before the rename: after a power loss the file is the old or the new one, never empty.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def no_space_said(path: Path, needed: int | None) -> Iterator[None]:
    """Within: running out of space (or quota) writing `path` is a DiskFullError naming its directory, the bytes
    `needed` (None: unknown) and the bytes free there."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE or isinstance(err, DiskFullError):
            raise
        raise DiskFullError(disk_full_message(path, needed)) from None


def disk_full_message(path: Path, needed: int | None) -> str:
    directory = Path(path).parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    need = f"writing {Path(path).name} needs {_mib(needed)}" if needed is not None else f"writing {Path(path).name}"
    has = f", and only {_mib(free)} is free there" if free is not None else ""
    return f"no space left in {directory}: {need}{has}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _readable_by_umask(directory: Path) -> None:
    """Give the files under `directory` the mode a plain `open` would (some writers, e.g. safetensors, use 0600)."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; restored at once
    for file in directory.rglob("*"):
        if file.is_file():
            os.chmod(file, 0o666 & ~umask)


@contextmanager
def atomic_save_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` (an old one is removed)."""
    target = Path(target)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would stay on the renamed directory; mkdir honours the umask.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        with no_space_said(target, None):
            yield tmp
        _readable_by_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # nothing half-made is left behind, not even the folders made for the target
            with contextlib.suppress(OSError):  # not empty: something else is in it now
                parent.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replaceable_output_dir(out: str, marker: str, command: str) -> Path:
    """`--out` of `command`: a new or empty directory, or an earlier output of the same command that holds nothing
    but what that command wrote there, which the command may replace (the replacement removes the directory whole).

    An earlier output is recognised by its `marker` file, whose `output_files` lists every file the command wrote
    (`write_output_marker`). A command never deletes a file it did not write, so each of these is a ConfigError
    naming --out and the fix: a file; a non-empty directory without the marker; an earlier output holding anything
    the list does not name (a file the user added, a folder, a link), whose message names a few of them and counts
    them all. A marker without the list (written before codetune kept one, or damaged) names none, so every file
    beside it counts as foreign.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out!r} is a file. Give a directory (new, empty, or an earlier {command} output).")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not (path / marker).is_file():
        raise ConfigError(f"--out {out!r} is a non-empty directory that is not an earlier `{command}` output; "
                          f"refusing to replace it. Give a new or empty directory.")
    recorded = recorded_output_files(path / marker)
    foreign = foreign_entries(path, {*(recorded or ()), marker})
    if foreign:
        shown = ", ".join(foreign[:FOREIGN_SHOWN]) + (f" and {len(foreign) - FOREIGN_SHOWN} more"
                                                      if len(foreign) > FOREIGN_SHOWN else "")
        why = "" if recorded is not None else f" (its {marker} lists no files it wrote, so none is known to be its)"
        them, count = ("it", "1 file or folder") if len(foreign) == 1 else ("them", f"{len(foreign)} files or folders")
        raise ConfigError(f"--out {out!r} holds {count} that no earlier `{command}` wrote there: {shown}{why}; "
                          f"replacing the directory would delete {them}. Move {them} out of {out}, or give another "
                          f"--out.")
    return path


# The marker's key listing what the command wrote, and how many foreign entries a refusal names.
OUTPUT_FILES = "output_files"
FOREIGN_SHOWN = 4


def write_output_marker(directory: Path, marker: str, content: dict[str, Any]) -> None:
    """Write `content` as the JSON file `marker` in `directory` (a command's output, complete but for the marker),
    with `output_files`: the path, relative to `directory` and with '/', of every file in it and of the marker.
    Call it last: what it lists is what a later run of the command may replace."""
    files = sorted({*(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()), marker})
    (directory / marker).write_text(json.dumps({**content, OUTPUT_FILES: files}, indent=2) + "\n", encoding="utf-8")


def recorded_output_files(marker: Path) -> set[str] | None:
    """The `output_files` of a marker file; None when it has no such list (or is not a JSON object)."""
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8: a damaged marker lists nothing
        return None
    files = content.get(OUTPUT_FILES) if isinstance(content, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def foreign_entries(directory: Path, recorded: set[str], prefix: str = "") -> list[str]:
    """What in `directory` is not in `recorded` (relative paths with '/'), sorted: files and links by their path, a
    folder that holds no recorded file as `name/` (not looked into: one entry, however much it holds)."""
    foreign = []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            rel = prefix + entry.name
            if not entry.is_dir(follow_symlinks=False):
                foreign += [] if rel in recorded else [rel]
            elif any(f.startswith(f"{rel}/") for f in recorded):
                foreign += foreign_entries(Path(entry.path), recorded, f"{rel}/")
            else:
                foreign.append(f"{rel}/")
    return foreign


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
