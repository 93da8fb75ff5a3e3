"""`import codetune` refuses a torch older than 2.6 in one line, without importing torch to find out."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys

import pytest

from helpers import ROOT

# Stands in for the installed torch's metadata, then imports the package the way `codetune` does.
IMPORT_WITH_TORCH = """
import importlib.metadata as metadata, sys
real = metadata.version
metadata.version = lambda name: {version!r} if name == "torch" else real(name)
import codetune
print("imported", "torch" in sys.modules)
"""


def import_codetune(torch_version: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", IMPORT_WITH_TORCH.format(version=torch_version)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("version", ["2.5.1", "2.4.0+cu124", "1.13.1"])
def test_an_old_torch_is_one_clear_line_at_import(version):
    result = import_codetune(version)
    assert result.returncode == 1 and "imported" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"codetune.TorchVersionError: codetune needs torch >= 2.6 (found {version}); "
                           f"install the CUDA build: pip install 'torch>=2.6' --index-url "
                           f"https://download.pytorch.org/whl/cu126"), last


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+ecf3bae40a", "2.13.0+cpu", "3.0.0"])
def test_the_floor_and_newer_import_without_loading_torch(version):
    result = import_codetune(version)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported False", "the check reads metadata; importing torch costs seconds"


def test_a_missing_torch_says_so():
    from codetune import TorchVersionError, check_torch_version

    with pytest.raises(TorchVersionError, match=r"needs torch >= 2.6 \(not installed\)"):
        check_torch_version(None)
    assert issubclass(TorchVersionError, ImportError)


def test_setup_cfg_states_the_same_floor():
    from codetune import TORCH_FLOOR

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    torch_line = [r for r in config["options"]["install_requires"].split() if re.match(r"torch\b", r)]
    assert torch_line == [f"torch>={'.'.join(map(str, TORCH_FLOOR))}"]
