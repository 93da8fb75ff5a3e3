"""Shared fixtures: small repositories built in tmp_path, and a tiny model trained on nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_fixture_repo


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Nothing in the suite may reach a model hub, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def allocator_variables_restored():
    """`codetune.__main__.main` sets the CUDA allocator's variables in os.environ: each test leaves them as it found
    them, so no test sees what an earlier one's `main` set."""
    import os

    from codetune.memory.allocator import ALLOC_CONF_VARIABLES, DEFAULT_MARKER

    names = (*ALLOC_CONF_VARIABLES, DEFAULT_MARKER)
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def fixture_repo(tmp_path: Path) -> Path:
    return write_fixture_repo(tmp_path / "repo")


