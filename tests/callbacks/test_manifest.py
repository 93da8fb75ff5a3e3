"""Manifest writer: the model phase records which base the run trained on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from callbacks.manifest import ManifestWriter
from codetune.run import MANIFEST_NAME, Manifest


def loaded_module(**extra) -> SimpleNamespace:
    """What on_fit_start reads of the module once configure_model loaded the base."""
    return SimpleNamespace(
        model=SimpleNamespace(get_nb_trainable_parameters=lambda: (10, 100)),
        causal_lm=SimpleNamespace(is_loaded_in_4bit=False, dtype=torch.float32, is_activation_checkpointing=False),
        hparams=SimpleNamespace(name_or_path="org/coder", modules_to_save=[]), optimizer_name="adamw",
        vram_plan=None, **extra)


@pytest.mark.parametrize("record", [
    {"kind": "hub", "revision": "0123456789abcdef0123456789abcdef01234567", "requested": "main"},
    None,  # a module that records nothing
])
def test_the_model_phase_records_the_base_revision(tmp_path, record):
    writer = ManifestWriter()
    writer._trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    writer.manifest = Manifest(tmp_path)
    module = loaded_module(base_revision=record) if record else loaded_module()
    writer.on_fit_start(writer._trainer, module)
    phase = json.loads((tmp_path / MANIFEST_NAME).read_text())["phase_results"]["phase_3_model"]
    assert phase["base_revision"] == record
    assert phase["name_or_path"] == "org/coder" and phase["trainable_parameters"] == 10
