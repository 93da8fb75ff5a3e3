"""The recorded base: a hub id's commit, a local directory's fingerprint, and the refusal when it changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codetune.errors import ConfigError
from codetune.model import revision as rev
from codetune.model.revision import base_revision, check_same_base, local_fingerprint, pinned_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def model_dir(root: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "tokenizer.json").write_text("{}")
    save_file(tensors or {"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)}, root / "model.safetensors")
    return root


def test_a_directory_keeps_its_fingerprint_wherever_it_is_copied(tmp_path):
    first = local_fingerprint(model_dir(tmp_path / "a"))
    copy = local_fingerprint(Path(shutil.copytree(tmp_path / "a", tmp_path / "b")))
    assert first["kind"] == "local" and first["revision"].startswith("sha256:") and len(first["revision"]) == 71
    assert copy["revision"] == first["revision"] and copy["path"] != first["path"]
    assert sorted(first["files"]) == ["config.json", "model.safetensors"], "what from_pretrained reads"
    check_same_base(first, copy)  # same base: no error
    assert pinned_revision(first) is None, "a directory is loaded as it is"


@pytest.mark.parametrize("change, changed", [
    ("config", "config.json"),
    ("values", "model.safetensors"),  # same names, dtypes and shapes: only the data samples see it
    ("dtype", "model.safetensors"),
])
def test_each_kind_of_change_is_caught_and_named(tmp_path, change, changed):
    base = model_dir(tmp_path / "base")
    recorded = local_fingerprint(base)
    if change == "config":
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    else:
        weights = load_file(base / "model.safetensors")
        weights = {"w": weights["w"] + 1} if change == "values" else {"w": weights["w"].double()}
        save_file(weights, base / "model.safetensors")
    now = local_fingerprint(base)
    with pytest.raises(ConfigError) as raised:
        check_same_base(recorded, now)
    message = str(raised.value)
    assert message.startswith(f"the base model changed since this run was trained ({changed} changed): "
                              f"recorded {recorded['revision']} of {base.resolve()}, now {now['revision']}")
    assert message.endswith(f"restore {base.resolve()} as it was when the run trained.")


def test_a_large_weights_file_is_sampled_not_read_whole(tmp_path):
    # 4 MiB of tensor data: 8 samples of 64 KiB read, 1/8 of it; a change at a sample is seen, one between is not.
    n = 1 << 20
    base = model_dir(tmp_path / "big", {"w": torch.zeros(n, dtype=torch.float32)})
    recorded = local_fingerprint(base)
    path = base / "model.safetensors"
    data_start = path.stat().st_size - 4 * n
    offsets = rev._sample_offsets(data_start, path.stat().st_size)
    assert len(offsets) == 8 and offsets[0] == data_start and offsets[-1] + rev._SAMPLE_BYTES == path.stat().st_size

    def with_byte(at: int) -> str:
        raw = bytearray(path.read_bytes())
        raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
        try:
            return local_fingerprint(base)["revision"]
        finally:
            raw[at] ^= 0xFF
            path.write_bytes(bytes(raw))

    assert with_byte(offsets[3] + 100) != recorded["revision"]
    assert with_byte(offsets[3] + rev._SAMPLE_BYTES + 100) == recorded["revision"], "the documented blind spot"
    assert local_fingerprint(base)["revision"] == recorded["revision"]


def test_a_sharded_model_fingerprints_the_index_and_every_shard(tmp_path):
    base = tmp_path / "sharded"
    base.mkdir()
    (base / "config.json").write_text("{}")
    for i in (1, 2):
        save_file({f"w{i}": torch.full((8,), float(i))}, base / f"model-0000{i}-of-00002.safetensors")
    index = {"metadata": {"total_size": 64}, "weight_map": {"w1": "model-00001-of-00002.safetensors",
                                                            "w2": "model-00002-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    recorded = local_fingerprint(base)
    assert sorted(recorded["files"]) == ["config.json", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    save_file({"w2": torch.full((8,), 7.0)}, base / "model-00002-of-00002.safetensors")  # the index is unchanged
    with pytest.raises(ConfigError, match=r"\(model-00002-of-00002.safetensors changed\)"):
        check_same_base(recorded, local_fingerprint(base))


def fake_hub_cache(root: Path, repo_id: str, refs: dict[str, str]) -> Path:
    """The part of a Hugging Face cache that maps a branch or tag to a commit: models--org--name/refs/<ref>."""
    folder = root / f"models--{repo_id.replace('/', '--')}" / "refs"
    folder.mkdir(parents=True)
    for ref, commit in refs.items():
        (folder / ref).write_text(commit)
    return root


def test_a_hub_id_records_the_commit_its_revision_points_to(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = fake_hub_cache(tmp_path / "hub", "org/coder", {"main": COMMIT, "v2": OTHER})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no directory named org/coder here
    assert base_revision("org/coder") == {"kind": "hub", "revision": COMMIT, "requested": None}
    assert base_revision("org/coder", "v2")["revision"] == OTHER
    assert base_revision("org/coder", COMMIT)["revision"] == COMMIT
    assert pinned_revision(base_revision("org/coder")) == COMMIT
    with pytest.raises(ConfigError, match=r"--model.name_or_path 'org/coder' --model.revision 'v3': not a local "
                                          r"directory, and no commit of it"):
        base_revision("org/coder", "v3")
    with pytest.raises(ConfigError, match=r"--model.name_or_path './models/missing': not a local directory"):
        base_revision("./models/missing")


def test_a_moved_hub_branch_is_refused_with_the_flag_that_pins_it():
    recorded = {"kind": "hub", "revision": COMMIT, "requested": None}
    check_same_base(recorded, dict(recorded))
    check_same_base(None, recorded)  # a run recorded before codetune recorded bases: nothing to compare
    with pytest.raises(ConfigError) as raised:
        check_same_base(recorded, {"kind": "hub", "revision": OTHER, "requested": None})
    assert str(raised.value) == (f"the base model changed since this run was trained: recorded commit {COMMIT} of the "
                                 f"hub model, now commit {OTHER} of the hub model; the adapter fits only the recorded "
                                 f"one: pass --model.revision {COMMIT}.")
    with pytest.raises(ConfigError, match="now sha256:abc of /models/coder; .*: resume with care."):
        check_same_base(recorded, {"kind": "local", "revision": "sha256:abc", "path": "/models/coder", "files": {}},
                        flag_hint="resume with care")
