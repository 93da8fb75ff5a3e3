"""Every shipped YAML parses against the real signatures and holds the values users rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetune.callbacks.generation_eval import GenerationEval
from codetune.cli import CodetuneCLI, build_cli
from codetune.data.datamodule import CodeDataModule
from codetune.model.module import CodeLoRAModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PYTHON_PROMPTS = ["def analyze_", "class Energy", "async def", "import"]
RUST_PROMPTS = ["fn process", "impl", "pub struct", "Result<", "#[derive(", "match", "fn new() -> Self", "where\n    T:"]
# What users rely on each shipped config to train with (by the name `--config` takes), and the repository paths
# its own ignore patterns drop even where the repository's .gitignore re-includes them (see `ignore_test_repo`).
SHIPPED = {
    "default": dict(seq_len=2048, rank=8, alpha=16, lr=1e-4, batch=8, accum=2, new_tokens=256,
                    prompts=PYTHON_PROMPTS, checkpointing="auto", ignored={"__pycache__/": "ignored"},
                    kept=["app.py", "lib.rs", "target/debug/build.rs"]),
    "rust": dict(seq_len=4096, rank=16, alpha=32, lr=2e-4, batch=4, accum=4, new_tokens=512,
                 prompts=RUST_PROMPTS, checkpointing=True, ignored={"target/": "ignored", "libdep.rlib": "ignored"},
                 kept=["__pycache__/app.py", "app.py", "lib.rs"]),
}


def parse(tmp_path: Path, *configs: Path) -> CodetuneCLI:
    args = [a for c in configs for a in ("--config", str(c))]
    return CodetuneCLI(CodeLoRAModule, CodeDataModule, run=False, auto_configure_optimizers=False,
                       args=[*args, "--data.repo", str(tmp_path), "--runs_dir", str(tmp_path / "runs")])


def ignore_test_repo(root: Path) -> Path:
    """A repository whose .gitignore re-includes what both shipped configs ignore: only the config's own
    patterns (which take precedence over .gitignore) can drop it. `*.rlib` is not a source extension, so without
    the pattern it is skipped as `extension`, not `ignored`."""
    for i, rel in enumerate(("app.py", "lib.rs", "__pycache__/app.py", "target/debug/build.rs", "libdep.rlib")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"x = {i}\n")  # distinct: duplicates are skipped
    (root / ".gitignore").write_text("!__pycache__/\n!target/\n!*.rlib\n")
    return root


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_reaches_the_objects_fit_builds(name, tmp_path):
    want = SHIPPED[name]
    repo = ignore_test_repo(tmp_path / "repo")
    # main's own builder, by the config's shipped name: its links, defaults and instantiation all apply.
    cli = build_cli(["--config", name, "--data.repo", str(repo), "--runs_dir", str(tmp_path / "runs")], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert model.hparams.name_or_path == data.hparams.tokenizer == "Qwen/Qwen2.5-Coder-1.5B"
    assert model.hparams.trust_remote_code is False and trainer.max_epochs == 3
    assert (data.seq_len, model.hparams.seq_len) == (want["seq_len"], want["seq_len"])
    assert (model.hparams.lora_rank, model.hparams.lora_alpha) == (want["rank"], want["alpha"])
    assert model.hparams.learning_rate == want["lr"]
    assert (data.batch_size, data.gradient_accumulation_steps, model.micro_batch_size) == \
        (want["batch"], want["accum"], want["batch"])
    assert data.optimizer_batch_size == 16  # windows per optimizer step: the same in both configs
    assert model.hparams.gradient_checkpointing == want["checkpointing"]
    (generation,) = [c for c in trainer.callbacks if isinstance(c, GenerationEval)]
    assert (generation.max_new_tokens, generation.prompts) == (want["new_tokens"], want["prompts"])
    # The data module's scan, the one its setup trains on: each config drops its own build output, not the other's.
    scan = data._scan()
    assert [f.rel_path for f in scan.files] == want["kept"]
    reasons = {s.rel_path: s.reason for s in scan.skipped}
    assert {path: reasons.get(path) for path in want["ignored"]} == want["ignored"]
    assert reasons.get("libdep.rlib") == want["ignored"].get("libdep.rlib", "extension")


def test_every_yaml_parses_and_names_its_command(tmp_path):
    base = CONFIGS / "training_config.yaml"
    for path in sorted(CONFIGS.rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# codetune fit --config"), f"{path.name}: first line must be the command that runs it"
        configs = (path,) if path.parent == CONFIGS else (base, path)
        parse(tmp_path, *configs)


def test_the_rust_config_checkpoints_where_the_plan_alone_would_not():
    """`gradient_checkpointing: true` in the Rust config keeps it on even on a card where `auto` (the default
    config's) turns it off: the choice `fit` makes (`codetune plan` makes the same one, from the same parser)."""
    from transformers import AutoConfig

    from codetune.memory.shapes import ModelShape
    from codetune.memory.units import GiB
    from codetune.commands.plan import parse_fit_config, plan_report

    qwen = ModelShape.from_config(AutoConfig.from_pretrained(str(CONFIGS.parent / "bench" / "models" /
                                                                 "qwen2.5-coder-1.5b")))
    roomy = 200 * GiB
    rust = parse_fit_config(["--config", "rust"])
    assert plan_report(qwen, rust.model, rust.data, roomy)["gradient_checkpointing"] is True
    auto = parse_fit_config(["--config", "rust", "--model.gradient_checkpointing", "auto"])
    assert plan_report(qwen, auto.model, auto.data, roomy)["gradient_checkpointing"] is False


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
    matched = sorted(str(p.relative_to(packaged.parent)) for g in globs for p in packaged.parent.glob(g))
    assert [m for m in matched if m.startswith("configs/")] == sorted(f"configs/{name}" for name in shipped)
