"""Every shipped YAML parses against the real signatures and holds the values users rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.cli import CodetuneCLI
from codetune.data.datamodule import CodeDataModule
from codetune.model.module import CodeLoRAModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

RUST_PROMPTS = ["fn process", "impl", "pub struct", "Result<", "#[derive(", "match", "fn new() -> Self", "where\n    T:"]
EXPECTED = {
    "training_config.yaml": dict(seq_len=2048, rank=8, alpha=16, lr=1e-4, batch=8, accum=2, new_tokens=256,
                                 prompts=["def analyze_", "class Energy", "async def", "import"],
                                 ignore=["__pycache__"]),
    "training_config_rust.yaml": dict(seq_len=4096, rank=16, alpha=32, lr=2e-4, batch=4, accum=4, new_tokens=512,
                                      prompts=RUST_PROMPTS, ignore=["target/", "*.rlib"]),
}


def parse(tmp_path: Path, *configs: Path) -> CodetuneCLI:
    args = [a for c in configs for a in ("--config", str(c))]
    return CodetuneCLI(CodeLoRAModule, CodeDataModule, run=False, auto_configure_optimizers=False,
                       args=[*args, "--data.repo", str(tmp_path), "--runs_dir", str(tmp_path / "runs")])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_values(name, tmp_path):
    cli = parse(tmp_path, CONFIGS / name)
    want, model, data = EXPECTED[name], cli.model, cli.datamodule
    assert model.hparams.name_or_path == "Qwen/Qwen2.5-Coder-1.5B"
    assert model.hparams.trust_remote_code is False
    assert (data.seq_len, model.hparams.seq_len) == (want["seq_len"], want["seq_len"])
    assert (model.hparams.lora_rank, model.hparams.lora_alpha) == (want["rank"], want["alpha"])
    assert model.hparams.learning_rate == pytest.approx(want["lr"])
    assert (data.batch_size, data.gradient_accumulation_steps) == (want["batch"], want["accum"])
    assert data.batch_size * data.gradient_accumulation_steps == 16
    assert model.micro_batch_size == data.batch_size
    generation = cli.config_init.generation
    assert generation.max_new_tokens == want["new_tokens"] and generation.prompts == want["prompts"]
    assert data.hparams.ignore_patterns == want["ignore"]


def test_every_yaml_parses_and_names_its_command(tmp_path):
    base = CONFIGS / "training_config.yaml"
    for path in sorted(CONFIGS.rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# codetune fit --config"), f"{path.name}: first line must be the command that runs it"
        configs = (path,) if path.parent == CONFIGS else (base, path)
        parse(tmp_path, *configs)


def test_rust_config_turns_gradient_checkpointing_on(tmp_path):
    assert parse(tmp_path, CONFIGS / "training_config_rust.yaml").model.hparams.gradient_checkpointing is True


def test_the_configs_are_package_data_and_the_checkout_links_to_them():
    import configparser
    import importlib.resources

    packaged = Path(str(importlib.resources.files("codetune") / "configs"))
    shipped = sorted(p.relative_to(packaged).as_posix() for p in packaged.rglob("*.yaml"))
    assert shipped == ["presets/demo.yaml", "training_config.yaml", "training_config_rust.yaml"]
    assert CONFIGS.resolve() == packaged.resolve()  # configs/ is the package's directory, not a copy
    setup = configparser.ConfigParser()
    setup.read(CONFIGS.parent / "setup.cfg")
    globs = setup["options.package_data"]["codetune"].split()
    assert sorted(str(p.relative_to(packaged.parent)) for g in globs for p in packaged.parent.glob(g)) == \
        sorted(f"configs/{name}" for name in shipped)


@pytest.mark.slow
def test_a_wheel_holds_the_configs_as_files(tmp_path):
    """`pip install .` gets the configs: build a wheel from a copy of the sources (about 2 s, nothing heavy)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = CONFIGS.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for package in ("codetune", "callbacks"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("codetune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = {info.filename: info for info in archive.infolist()}
        configs = sorted(name for name in files if name.startswith("codetune/configs/"))
        assert configs == ["codetune/configs/presets/demo.yaml", "codetune/configs/training_config.yaml",
                           "codetune/configs/training_config_rust.yaml"]
        # Real files with the checkout's text, not links.
        assert archive.read("codetune/configs/training_config_rust.yaml") == \
            (CONFIGS / "training_config_rust.yaml").read_bytes()
