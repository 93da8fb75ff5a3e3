"""`codetune`: LightningCLI for training, plus the run directory conventions.

`main(args=None)` is the entry point (tests call `main(["fit", "--config", ...])`). Configs compose
with repeated `--config`; every knob is a typed `__init__` parameter of the data module
(`--data.*`), the module (`--model.*`), the trainer (`--trainer.*`) or a callback
(`--generation.*`, `--oom_backoff.*`, `--vram.*`, `--checkpoint.*`). The last line a training command prints is its run directory.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from typing_extensions import override

from callbacks.generation_eval import GenerationEval
from callbacks.manifest import ManifestWriter
from callbacks.oom_backoff import OOMBackoff
from callbacks.random_state import RandomState
from callbacks.vram_monitor import VRAMMonitor
from codetune.checkpoint_io import AtomicCheckpointIO
from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError, exit_status
from codetune.model.loading import cuda_capability, precision_for, resolve_dtype
from codetune.model.module import CodeLoRAModule
from codetune.run import atomic_write_text, default_run_name

CONFIG_NAME = "config.yaml"


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as `config.yaml` in the run directory (atomically, rank zero)."""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / CONFIG_NAME, text)


class CodetuneCLI(LightningCLI):
    """LightningCLI with codetune's run directory, callbacks and linked arguments."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under --runs_dir (default: a timestamp).")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run directories are created.")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=25,
                            help="Also write checkpoints/last.ckpt every N optimizer steps (0: only at epoch ends, "
                                 "per --checkpoint.*). A killed run resumes from it with --ckpt_path last.")
        parser.add_lightning_class_args(GenerationEval, "generation")
        parser.add_lightning_class_args(OOMBackoff, "oom_backoff")
        parser.add_lightning_class_args(VRAMMonitor, "vram")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No version counter: both checkpoint callbacks must overwrite one last.ckpt, not write last-v1.ckpt.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})
        # Facts stated once: the model fixes the tokenizer; the window and micro-batch are data settings.
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.revision", "data.revision")
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.batch_size", "model.micro_batch_size")

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.run_name = config.run_name or default_run_name()
        run_dir = Path(config.runs_dir) / config.run_name
        self.new_run_dir = None if run_dir.exists() else run_dir
        config.trainer.default_root_dir = str(run_dir)
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False),
            )
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")
        if config.checkpoint_every_n_steps < 0:
            raise ConfigError(f"--checkpoint_every_n_steps={config.checkpoint_every_n_steps}: use a positive number "
                              "of optimizer steps, or 0 to checkpoint only at epoch ends.")

    @override
    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, plus what codetune derives from flags. Added here rather than to the config, so
        config.yaml holds only what the user chose and `--config RUN/config.yaml` can resume a run."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_progress_bar is not False:
            callbacks.append(RichProgressBar())
        if config.checkpoint_every_n_steps > 0:
            # A second ModelCheckpoint: Lightning's triggers are exclusive, so the --checkpoint.* one cannot
            # also save every N steps. Both write the same last.ckpt; the newest is what a resume loads.
            callbacks.append(ModelCheckpoint(dirpath=config.checkpoint.dirpath, save_last=True, save_top_k=0,
                                             every_n_train_steps=config.checkpoint_every_n_steps,
                                             enable_version_counter=False))
        plugins = trainer.plugins if isinstance(trainer.plugins, list) else [p for p in [trainer.plugins] if p]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins = [*plugins, AtomicCheckpointIO()]
        chosen = trainer.precision is not None or any(isinstance(p, Precision) for p in plugins)
        derived = {} if chosen else {"precision": derived_precision(
            self.config[self.subcommand] if self.subcommand else self.config)}
        return super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins, **derived, **kwargs})

    def fit(self, **kwargs) -> None:
        """`trainer.fit`; bad input found once the run started (an empty repository, a model that will
        not load) leaves no half-made run directory behind, unless the directory held an earlier run."""
        try:
            with warnings.catch_warnings():
                # Lightning's guess, from the DataLoader alone, that a mid-epoch resume replays data: the data
                # module holds the data position and restores it (codetune/data/sampler.py).
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
                # ... and its advice to save weights from *before* the optimizer step: a step checkpoint here is
                # taken after a whole optimizer step, which is the state a resume must continue from.
                warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
                self.trainer.fit(**kwargs)
        except ConfigError:
            if self.new_run_dir is not None:
                shutil.rmtree(self.new_run_dir, ignore_errors=True)
            raise


def derived_precision(config: Namespace) -> str:
    """--trainer.precision when it is not given: the one --model.dtype trains under on the device the trainer
    will pick (`auto` dtype: bf16-mixed from compute capability 8.0, 16-mixed below, 32-true on CPU)."""
    accelerator = config.trainer.accelerator
    cuda = torch.cuda.is_available() and (not isinstance(accelerator, str) or accelerator in ("auto", "gpu", "cuda"))
    devices = config.trainer.devices
    first = devices[0] if isinstance(devices, (list, tuple)) and devices else 0
    return precision_for(resolve_dtype(config.model.dtype, "cuda" if cuda else "cpu",
                                       cuda_capability(first) if cuda else None))


def build_cli(args: Sequence[str] | None, cli_class: type[CodetuneCLI] = CodetuneCLI, run: bool = True) -> CodetuneCLI:
    """The CLI over `args` (None: sys.argv); `run=False` parses and instantiates without a subcommand."""
    with warnings.catch_warnings():
        # `main` always passes the command line explicitly (it strips `prepare`), which Lightning warns about.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _instantiate_cli(args, cli_class, run)


def _instantiate_cli(args: Sequence[str] | None, cli_class: type[CodetuneCLI], run: bool) -> CodetuneCLI:
    return cli_class(
        CodeLoRAModule,
        CodeDataModule,
        args=None if args is None else list(args),
        seed_everything_default=42,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ManifestWriter(), RandomState()], "log_every_n_steps": 1},
        auto_configure_optimizers=False,
        run=run,
        parser_kwargs={"description": "Fine-tune a code LLM on your repository with QLoRA. Other commands: "
                                      "`codetune inspect REPO` (language mix, skipped files, recommended "
                                      "config), `codetune prepare ... --out DIR` (the packed data only), "
                                      "`codetune compare RUN...` (runs side by side), `codetune generate RUN "
                                      "--prompt P` and `codetune merge RUN --out DIR` (use a finished run)."},
    )


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of every command (`inspect` and `prepare` included); returns the exit status."""
    args = sys.argv[1:] if args is None else list(args)
    command = args[0] if args else None
    if command == "inspect":
        from codetune.inspect import run

        return run(args[1:])
    if command == "compare":
        from codetune.compare import run as compare

        return compare(args[1:])
    if command == "plan":
        from codetune.plan import main as plan_main

        return plan_main(args[1:])
    if command == "prepare":
        from codetune.prepare import main as prepare_main

        return exit_status(lambda: prepare_main(args[1:]), "codetune prepare")
    if command in ("generate", "merge"):
        from codetune.use import main_generate, main_merge

        use_main = main_generate if command == "generate" else main_merge
        return exit_status(lambda: use_main(args[1:]), f"codetune {command}")
    return exit_status(lambda: _run_lightning_cli(args))


def _run_lightning_cli(args: list[str]) -> int:
    cli = build_cli(args)
    if cli.subcommand == "fit":
        print(cli.trainer.default_root_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
