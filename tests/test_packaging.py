"""What an install of codetune holds: every package of the tree, callbacks/ as codetune.callbacks and nothing
named `callbacks` at the top of site-packages; the callback paths the documents show resolve."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def listed_packages() -> tuple[set[str], dict[str, str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = set(config["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in config["options"]["package_dir"].strip().splitlines())
    return packages, mapping


def tree_packages() -> set[str]:
    """The importable packages of the checkout, named as installed (callbacks/ is codetune.callbacks)."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "codetune").rglob("__init__.py")}
    found |= {"codetune.callbacks" + "".join(f".{part}" for part in p.parent.relative_to(ROOT / "callbacks").parts)
              for p in (ROOT / "callbacks").rglob("__init__.py")}
    return found


def test_setup_cfg_lists_every_package_of_the_tree():
    packages, mapping = listed_packages()
    assert mapping == {"codetune.callbacks": "callbacks"}
    assert tree_packages() <= packages, "add the missing package to setup.cfg [options] packages"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (a few seconds, nothing heavy): setuptools' build/ folder in the
    checkout would keep modules that moved since."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("codetune", "callbacks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    return next((tmp_path / "dist").glob("codetune-*.whl"))


@pytest.mark.slow
def test_the_wheel_installs_callbacks_under_codetune_and_no_top_level_callbacks(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("callbacks/")]
    shipped = {Path(n).name for n in names if n.startswith("codetune/callbacks/")}
    assert {p.name for p in (ROOT / "callbacks").glob("*.py")} <= shipped
    # A fresh venv with only codetune in it: `import callbacks` has nothing to find.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
             "import importlib.util as u\n"
             "print(u.find_spec('callbacks') is None, (u.find_spec('codetune').submodule_search_locations[0]))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out[0] == "True" and Path(out[1], "callbacks", "vram_monitor.py").is_file()


@pytest.mark.slow
def test_the_wheel_holds_the_configs_as_files(wheel):
    """`pip install .` gets the configs, as real files with the checkout's text (not links)."""
    with zipfile.ZipFile(wheel) as archive:
        configs = sorted(name for name in archive.namelist() if name.startswith("codetune/configs/"))
        assert configs == ["codetune/configs/presets/demo.yaml", "codetune/configs/training_config.yaml",
                           "codetune/configs/training_config_rust.yaml"]
        assert archive.read("codetune/configs/training_config_rust.yaml") == \
            (ROOT / "codetune" / "configs" / "training_config_rust.yaml").read_bytes()


@pytest.mark.slow
def test_the_wheel_holds_the_embedded_model_whole(wheel):
    """`pip install .` gets the embedded model: its weights, config, tokenizer and card, byte for byte."""
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(name for name in archive.namelist() if name.startswith("codetune/embedded/"))
        assert shipped == sorted(f"codetune/embedded/{p.name}" for p in (ROOT / "codetune" / "embedded").iterdir())
        assert "codetune/embedded/model.safetensors" in shipped and "codetune/embedded/README.md" in shipped
        assert archive.read("codetune/embedded/model.safetensors") == \
            (ROOT / "codetune" / "embedded" / "model.safetensors").read_bytes()


def documented_callbacks() -> list[str]:
    return [m for doc in DOCUMENTS for m in re.findall(r"--trainer\.callbacks\+=([\w.]+)", doc.read_text())]


def test_the_documents_show_adding_a_callback():
    assert documented_callbacks()


@pytest.mark.parametrize("name", documented_callbacks())
def test_a_documented_callback_path_resolves(tmp_path, name):
    from codetune.cli import build_cli

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "lib.py").write_text("def f():\n    return 1\n")
    shown = next(re.search(rf"--trainer\.callbacks\+={re.escape(name)}[^`]*", doc.read_text()).group(0)
                 for doc in DOCUMENTS if f"callbacks+={name}" in doc.read_text())
    cli = build_cli(["--config", "default", "--data.repo", str(repo), "--runs_dir", str(tmp_path / "runs"),
                     *shown.split()], run=False)
    assert any(type(c).__name__ == name.rpartition(".")[2] for c in cli.trainer.callbacks)
