"""Which base model a run trained on, recorded so that every later load gets the same one or refuses.

A LoRA adapter fits only the weights it was trained against, and a hub id names a moving branch:
`Qwen/Qwen2.5-Coder-1.5B` may be another commit next month; a local directory may be overwritten.
So the run records its base (`base_revision`), and `generate`, `merge` and a resume compare or pin:

- **hub id**: the commit hash that the requested revision (`--model.revision`, default the main
  branch) resolves to, through huggingface_hub (the Hub, or offline the cache's `refs/`). Loading
  with that hash (`pinned_revision`) gets exactly those files again.
- **local directory** (and the 'tiny' model's `base_model/`): a fingerprint of what `from_pretrained`
  reads: `config.json` and the weights index in full, and of each weights file its size, its
  safetensors header (tensor names, dtypes, shapes, offsets) and 8 samples of 64 KiB spread evenly
  over its tensor data. Hashing every byte would read the whole model (GBs: minutes from a network
  disk) at each `generate`; the fingerprint reads under 1 MiB a file and still changes when the
  model does: another architecture or dtype changes the header, and other weights of the same
  shapes (a retrained or re-merged checkpoint) change nearly every tensor, so the samples. It can
  miss an edit confined to bytes between the samples (one tensor patched by hand).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from codetune.data.model_source import local_model_dir
from codetune.errors import ConfigError

HUB, LOCAL = "hub", "local"
CONFIG_FILE = "config.json"
# What from_pretrained loads, in its order of preference: (index, single file).
_WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                   ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_SAMPLES, _SAMPLE_BYTES = 8, 64 * 1024


def base_revision(source: str | Path, revision: str | None = None) -> dict[str, Any]:
    """What the base at `source` is now: `{"kind": "hub", "revision": <commit>, "requested": revision}` for a hub
    id, `{"kind": "local", "revision": "sha256:...", "path": ..., "files": {name: digest}}` for a directory."""
    path = local_model_dir(source)
    if path is not None:
        return local_fingerprint(path)
    return {"kind": HUB, "revision": hub_commit(str(source), revision), "requested": revision}


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit hash `revision` (None: the default branch) of hub model `repo_id` points to now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RevisionResolutionError

    try:
        return HfApi().resolve_revision(repo_id, revision=revision).resolved
    except (RevisionResolutionError, HfHubHTTPError, HFValidationError) as err:
        which = f" --model.revision {revision!r}" if revision else ""
        raise ConfigError(f"--model.name_or_path {repo_id!r}{which}: not a local directory, and no commit of it on the "
                          f"Hugging Face Hub could be found ({str(err).strip().rstrip('.')}). Use a local model "
                          f"directory, a hub id that is cached or reachable, or 'embedded' (offline).") from err


def local_fingerprint(directory: Path) -> dict[str, Any]:
    """The fingerprint of a model directory (see the module docstring): one digest per file read, and their hash."""
    files = {name: _file_digest(directory / name) for name in _fingerprinted_files(directory)}
    combined = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())).encode())
    return {"kind": LOCAL, "revision": f"sha256:{combined.hexdigest()}", "path": str(directory.resolve()),
            "files": files}


def pinned_revision(record: dict[str, Any] | None) -> str | None:
    """The `revision` to load a recorded base with: its commit for a hub id; None for a directory (or no record)."""
    return record["revision"] if record and record.get("kind") == HUB else None


def check_same_base(recorded: dict[str, Any] | None, now: dict[str, Any], flag_hint: str | None = None) -> None:
    """Raise ConfigError when the base `now` is not the `recorded` one. `flag_hint` says how to get the recorded
    base back (by default: `--model.revision <commit>` for a hub id, restoring the files for a directory). A run
    recorded before codetune recorded bases (`recorded` None) is not checked."""
    if recorded is None or (recorded.get("kind"), recorded.get("revision")) == (now["kind"], now["revision"]):
        return
    if recorded.get("kind") == LOCAL and now["kind"] == LOCAL:
        old, new = recorded.get("files") or {}, now["files"]
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        detail = f" ({', '.join(changed)} changed)" if changed else ""
    else:
        detail = ""
    if flag_hint is None:
        flag_hint = (f"pass --model.revision {recorded['revision']}" if recorded.get("kind") == HUB else
                     f"restore {recorded.get('path', 'the directory')} as it was when the run trained")
    raise ConfigError(f"the base model changed since this run was trained{detail}: recorded {_describe(recorded)}, "
                      f"now {_describe(now)}; the adapter fits only the recorded one: {flag_hint}.")


def _describe(record: dict[str, Any]) -> str:
    if record.get("kind") == HUB:
        return f"commit {record['revision']} of the hub model"
    return f"{record.get('revision')} of {record.get('path', 'a local directory')}"


def _fingerprinted_files(directory: Path) -> list[str]:
    names = [CONFIG_FILE] if (directory / CONFIG_FILE).is_file() else []
    for index, single in _WEIGHT_LAYOUTS:
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text(encoding="utf-8")).get("weight_map", {})
            return [*names, index, *sorted(set(weight_map.values()))]
        if (directory / single).is_file():
            return [*names, single]
    return names


def _file_digest(path: Path) -> str:
    """sha256 of a whole small file (config, index); of size + header + samples for a weights file."""
    if path.suffix == ".json":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.is_file():  # a shard the index names but the directory lacks
        return "missing"
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        data_start = _safetensors_data_start(f, size) if path.suffix == ".safetensors" else 0
        f.seek(0)
        digest.update(f.read(data_start))  # the header: what tensors the file holds, and where
        for offset in _sample_offsets(data_start, size):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_data_start(f, size: int) -> int:
    # A safetensors file is: 8 bytes (little-endian u64) header length, the JSON header, then the tensor data.
    head = f.read(8)
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else size
    return 8 + header_len if 8 + header_len <= size else 0  # not a valid header: sample the file as a whole


def _sample_offsets(start: int, end: int) -> list[int]:
    """Where the samples of [start, end) begin: all of it when short, else evenly spaced, the last ending at `end`."""
    span = end - start
    if span <= _SAMPLES * _SAMPLE_BYTES:
        return list(range(start, end, _SAMPLE_BYTES))
    step = (span - _SAMPLE_BYTES) // (_SAMPLES - 1)
    return [start + i * step for i in range(_SAMPLES)]
