"""`codetune`: LightningCLI for training, plus the run directory conventions.

`run_fit(args)` is `codetune fit` (`codetune.__main__.main` dispatches every command to its module). Configs compose
with repeated `--config`; every knob is a typed `__init__` parameter of the data module
(`--data.*`), the module (`--model.*`), the trainer (`--trainer.*`) or a callback
(`--generation.*`, `--oom_backoff.*`, `--vram.*`, `--checkpoint.*`). The last line a training command prints is its run directory.

`--config` takes a YAML file or the name of a config shipped in the package (`default`, `rust`, `demo`:
`codetune/configs/`, which the checkout's `configs/` links to). A bad flag or config key is one short
message naming the closest real flag, before anything is built. Lightning's console lines that ask
nothing of the user (device availability, seed, tips, its model summary) are dropped here, by name.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from codetune.callbacks.generation_eval import GenerationEval
from codetune.callbacks.interrupt import InterruptCheckpoint
from codetune.callbacks.manifest import ManifestWriter, begin_manifest
from codetune.callbacks.oom_backoff import OOMBackoff
from codetune.callbacks.progress_bar import RunProgressBar
from codetune.callbacks.random_state import RandomState
from codetune.callbacks.vram_monitor import VRAMMonitor
from codetune.run.checkpoint_io import AtomicCheckpointIO
from codetune.data.datamodule import CodeDataModule
from codetune.errors import ConfigError, DiskFullError
from codetune.model.loading import cuda_capability, precision_for, resolve_dtype
from codetune.model.module import CodeLoRAModule
from codetune.storage import CONFIG_NAME, MANIFEST_NAME, atomic_write_text
from codetune.run.directory import (CHECKPOINTS_DIR, TENSORBOARD_DIR, check_new_run_dir, kept_and_continue,
                                    open_run_dir, remove_new_run, resume_checkpoint, resumed_run_dir, say_if_killed)
from codetune.run.manifest import default_run_name
from codetune.run.tensorboard import EpochlessTensorBoardLogger

# The run directory rank zero chose, for the ranks Lightning's DDP launcher starts: they run this command line again
# (with their rank in the environment), and a default --run_name is a timestamp that would differ.
RUN_DIR_ENV = "CODETUNE_RUN_DIR"


class CodetuneCLI(LightningCLI):
    """LightningCLI with codetune's run directory, callbacks and linked arguments; `fit` is its one subcommand."""

    PROG = "codetune"
    DESCRIPTION = "Fine-tune a code LLM on your repository with QLoRA (`codetune --help` lists the other commands)."

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        # No validate/test/predict: the module has no test or predict step, and the held-out loss that
        # `validate` would give is measured at the end of every fit (MANIFEST.json's final_val_loss).
        return {"fit": LightningCLI.subcommands()["fit"]}

    @override
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={L.__version__}"])
        # Errors raise, to be reworded by parse_arguments, instead of printing the whole usage before them.
        parser = self.parser_class(**{**kwargs, "exit_on_error": False})
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="A YAML config file, or the name of a shipped one: "
                                 f"{', '.join(shipped_configs())}. Repeat to compose (later ones override).")
        return parser

    @override
    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # jsonargparse names a subcommand's program `codetune [options] fit`; users type `codetune fit`.
        for name, parser in getattr(self, "_subcommand_parsers", {}).items():
            parser.prog = f"{self.parser.prog} {name}"

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Whether --run_name was typed, not read from a --config: a resume goes where the command line says.
        self.run_name_typed = any(a == "--run_name" or str(a).startswith("--run_name=") for a in args or ())
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise ConfigError(describe_parse_error(str(err), self._parser_of(args), args)) from None

    def _parser_of(self, args: Sequence[str]) -> LightningArgumentParser:
        """The parser that reads the flags: the subcommand's, or the only one (`prepare`, `plan`)."""
        subcommands = getattr(self, "_subcommand_parsers", {})
        return next((subcommands[a] for a in args if a in subcommands), self.parser)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under --runs_dir (default: a timestamp). A name that is taken "
                                 "is refused, unless --ckpt_path resumes that run or --overwrite_run replaces it.")
        parser.add_argument("--runs_dir", type=str, default="runs",
                            help="Where run directories are created (relative: to the current directory).")
        parser.add_argument("--overwrite_run", type=bool, default=False,
                            help="Train a new run in an existing --run_name, deleting that run's checkpoints, "
                                 "logs, adapter and manifest first.")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=25,
                            help="Write checkpoints/last.ckpt every N optimizer steps (0: none but those at each "
                                 "epoch's last step, the run's last step and a stop). A killed run resumes from it "
                                 "with --ckpt_path last.")
        parser.add_lightning_class_args(GenerationEval, "generation")
        parser.add_lightning_class_args(OOMBackoff, "oom_backoff")
        parser.add_lightning_class_args(VRAMMonitor, "vram")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No version counter: every checkpoint writer must overwrite one last.ckpt, not write last-v1.ckpt. No last.ckpt
        # from this callback by default: the interrupt callback writes it at each epoch's last step, before the
        # epoch's validation; one written after it does not resume exactly (callbacks/interrupt.py).
        parser.set_defaults({"checkpoint.save_last": False, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})
        # The module prints its own one-line summary (trainable of total parameters); Lightning's table adds
        # a FLOPs column of zeros and the metric objects.
        parser.set_defaults({"trainer.enable_model_summary": False})
        # Facts stated once: the model fixes the tokenizer; the window and micro-batch are data settings.
        parser.link_arguments("model.name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.revision", "data.revision")
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.batch_size", "model.micro_batch_size")

    @override
    def before_instantiate_classes(self) -> None:
        """The run directory, chosen and checked before anything is built (nothing is written yet: `fit` creates
        and locks it). Its paths are given to the trainer in `instantiate_trainer`, not written into the config,
        so that the config.yaml a run saves re-runs as a new run wherever it is copied."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint_every_n_steps < 0:
            raise ConfigError(f"--checkpoint_every_n_steps={config.checkpoint_every_n_steps}: use a positive number "
                              "of optimizer steps, or 0 for no periodic checkpoint.")
        if self.subcommand != "fit":
            return
        check_trains_something(config.trainer)
        self.resuming = config.ckpt_path is not None
        self.run_dir = run_directory(config, self.run_name_typed)
        self.checkpoint = resume_checkpoint(config.ckpt_path, self.run_dir) if self.resuming else None
        if rank_zero_only.rank == 0 and not self.resuming:
            check_new_run_dir(self.run_dir, config.overwrite_run)

    @override
    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, plus what codetune derives from flags. Added here rather than to the config, so
        config.yaml holds only what the user chose and `--config RUN/config.yaml` can resume a run."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if self.subcommand == "fit":
            kwargs = {**self._run_dir_arguments(config), **kwargs}
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_progress_bar is not False:
            # First, so that it is gone before any other callback prints at the end of training.
            callbacks.insert(0, RunProgressBar())
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
        trainer = super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins, **derived, **kwargs})
        evaluations_last(trainer.callbacks)
        return trainer

    def _run_dir_arguments(self, config: Namespace) -> dict:
        """The trainer's run directory and logger, and the --checkpoint callback's folder, all inside the run."""
        arguments = {"default_root_dir": str(self.run_dir)}
        given = self.config[self.subcommand]
        if run_default_logger(given.trainer.logger):
            arguments["logger"] = EpochlessTensorBoardLogger(save_dir=str(self.run_dir), name=TENSORBOARD_DIR,
                                                             version="", default_hp_metric=False)
        if given.checkpoint.dirpath is None or another_runs_folder(given.checkpoint.dirpath, self.run_dir):
            config.checkpoint.dirpath = os.path.realpath(self.run_dir / CHECKPOINTS_DIR)
        return arguments

    def fit(self, **kwargs) -> None:
        """`trainer.fit` in the run directory, which this process creates (or reuses, resuming) and locks first.
        Bad input found once the run started (an empty repository, a model that will not load) leaves no
        half-made run directory behind; a full disk says what was kept and how to continue."""
        interrupt = next(c for c in self.trainer.callbacks if isinstance(c, InterruptCheckpoint))
        interrupt.install(self.trainer)  # from the scan on: a signal at any moment leaves a whole manifest
        lock, created = None, False
        try:
            if rank_zero_only.rank == 0:
                lock, created = open_run_dir(self.run_dir, self.resuming, self.config[self.subcommand].overwrite_run)
                say_if_killed(self.run_dir)
                os.environ[RUN_DIR_ENV] = str(self.run_dir.resolve())
                self._save_config()
                begin_manifest(self.run_dir)
            kwargs["ckpt_path"] = str(self.checkpoint) if self.checkpoint else None
            with warnings.catch_warnings():
                # Lightning's guess, from the DataLoader alone, that a mid-epoch resume replays data: the data
                # module holds the data position and restores it (codetune/data/sampler.py).
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
                # ... and its advice to save weights from *before* the optimizer step: a step checkpoint here is
                # taken after a whole optimizer step, which is the state a resume must continue from.
                warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
                # A moved run's checkpoint names the folder it was saved in; the run's own folder is the one used.
                warnings.filterwarnings("ignore", message="The dirpath has changed from")
                self.trainer.fit(**kwargs)
        except ConfigError:
            if created and lock is not None:
                remove_new_run(self.run_dir, lock)
            raise
        except DiskFullError as err:
            raise DiskFullError(f"{err}. {kept_and_continue(self.run_dir)}") from None
        finally:
            interrupt.restore()
            if lock is not None:
                lock.release()

    def _save_config(self) -> None:
        """config.yaml: the run's settings, without what names this run (its name, its resume, its overwrite), so
        that `--config RUN/config.yaml` alone starts a new run and with `--ckpt_path last` resumes this one."""
        config = self.config[self.subcommand].clone()
        config.ckpt_path, config.run_name, config.overwrite_run = None, None, False
        text = self._parser(self.subcommand).dump(config, skip_none=False)
        atomic_write_text(self.run_dir / CONFIG_NAME, text)


def evaluations_last(callbacks: list) -> None:
    """Moves the generation eval after the other callbacks (checkpointing aside, which Lightning keeps last), in
    place: the manifest has started training and the interrupt handler knows an evaluation runs (at the start of
    training and at each epoch's end) before it starts, so a signal during it is recorded where it landed."""
    evaluations = [c for c in callbacks if isinstance(c, GenerationEval)]
    others = [c for c in callbacks if not isinstance(c, (GenerationEval, ModelCheckpoint))]
    callbacks[:] = others + evaluations + [c for c in callbacks if isinstance(c, ModelCheckpoint)]


def run_directory(config: Namespace, run_name_typed: bool) -> Path:
    """The directory this fit trains in: the resumed run's (see `codetune.run.directory.resumed_run_dir`; a --run_name
    typed on the command line names it), else `--runs_dir`/`--run_name`; a rank started by DDP's launcher takes
    rank zero's."""
    if rank_zero_only.rank != 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if config.ckpt_path in ("best", "hpc") or str(config.ckpt_path).startswith("registry"):
        raise ConfigError(f"--ckpt_path {config.ckpt_path}: codetune resumes a run from `last` (its "
                          f"checkpoints/last.ckpt) or from a .ckpt file.")
    configs = [str(path) for path in (config.get("config") or []) if path is not None]
    resumed = resumed_run_dir(config.ckpt_path, config.run_name, config.runs_dir, configs, run_name_typed)
    return resumed or Path(config.runs_dir).expanduser() / (config.run_name or default_run_name())


def run_default_logger(logger: object) -> bool:
    """Whether --trainer.logger is the run's own TensorBoard logger: unset, or as a config.yaml of an earlier
    codetune wrote it out (with that run's absolute save_dir, which must not receive this run's events)."""
    if logger in (None, True):
        return True
    if not isinstance(logger, Namespace):
        return False
    init = logger.get("init_args") or Namespace()
    return (logger.get("class_path") == "codetune.run.tensorboard.EpochlessTensorBoardLogger"
            and init.get("name") == TENSORBOARD_DIR)


def another_runs_folder(dirpath: str, run_dir: Path) -> bool:
    """Whether --checkpoint.dirpath is another run's checkpoints/ folder, as a config.yaml of an earlier codetune
    wrote it out (the run it names, or the place it was moved from): this run keeps its checkpoints in its own."""
    folder = Path(dirpath).expanduser()
    if folder.name != CHECKPOINTS_DIR or folder.resolve().parent == run_dir.resolve():
        return False
    return (folder.parent / MANIFEST_NAME).is_file() or not folder.parent.exists()


def check_trains_something(trainer: Namespace) -> None:
    """A fit that would train no step is refused before anything is built: it would export the untrained adapter."""
    for flag in ("max_epochs", "max_steps"):
        if getattr(trainer, flag) == 0:
            raise ConfigError(f"--trainer.{flag} 0 trains nothing, so the run would end with the untrained adapter. "
                              f"Give at least 1 (or leave it unset).")


# -- configs shipped with the package -----------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """Short name -> YAML shipped in codetune/configs/: `default` (training_config.yaml), `rust`
    (training_config_rust.yaml), and each preset by its stem (`demo`)."""
    root = Path(str(importlib.resources.files("codetune") / "configs"))
    names = {}
    for path in sorted(root.glob("training_config*.yaml")):
        names[path.stem.removeprefix("training_config").removeprefix("_") or "default"] = path
    for path in sorted((root / "presets").glob("*.yaml")):
        names[path.stem] = path
    return names


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """`args` with each `--config NAME` of a shipped config replaced by its path; a --config that is neither a
    file nor a shipped name is a ConfigError listing the names."""
    out, args = [], list(args)
    while args:
        arg = args.pop(0)
        if arg in ("-c", "--config") and args:
            out += [arg, _config_path(args.pop(0))]
        elif arg.startswith("--config="):
            out.append(f"--config={_config_path(arg.partition('=')[2])}")
        else:
            out.append(arg)
    return out


def _config_path(value: str) -> str:
    if Path(value).expanduser().is_file() or value.lstrip().startswith("{") or "\n" in value:
        return value  # a file, or YAML/JSON given inline (jsonargparse reads both)
    names = shipped_configs()
    if value in names:
        return str(names[value])
    raise ConfigError(f"--config {value}: no such file, and not the name of a shipped config "
                      f"({', '.join(names)}). Give a YAML file's path or one of those names.")


# -- parse errors, reworded -------------------------------------------------------------------------------


def describe_parse_error(message: str, parser: LightningArgumentParser, args: Sequence[str]) -> str:
    """jsonargparse's error as one message: every unknown flag, and every unknown key of each --config file,
    with the closest real name; a bad value with its flag first."""
    message = " ".join(message.split())
    known = parser_keys(parser)
    command = parser.prog
    unrecognized = re.match(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        flags = [a.partition("=")[0] for a in unrecognized[1].split() if a.startswith("-")]
        wrong = [f"{flag}{_suggestion(flag.lstrip('-'), known, '--')}" for flag in flags]
        return f"`{command}` has no flag {', '.join(wrong)}. `{command} --help` lists them."
    files = [f"{path}: unknown key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
             for path, keys in unknown_config_keys(args, known)]
    unknown = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", message) or re.match(
        r"Key '([^']+)' is not expected", message)
    if files:  # every typo of every file, whichever one jsonargparse stopped at
        also = "" if unknown else f" Also: {_reworded(message)}"
        return f"{'; '.join(files)}. `{command} --help` lists the settings.{also}"
    if unknown:
        return f"`{command}` has no setting {unknown[1]}{_suggestion(unknown[1], known)}. `{command} --help` lists them."
    return _reworded(message)


def _reworded(message: str) -> str:
    """A bad value's message with its flag first (jsonargparse starts with `Parser key "data.seq_len":`)."""
    bad_value = re.match(r'Parser key "([^"]+)": (.*)', message)
    return f"--{bad_value[1]}: {bad_value[2]}" if bad_value else message


def parser_keys(parser: LightningArgumentParser) -> set[str]:
    """Every setting the parser knows, dotted (`data.seq_len`), as flags and config keys spell it."""
    # `--trainer.logger.help CLASS` and the like print help; they are no setting.
    return {action.dest for action in parser._actions
            if action.dest != argparse.SUPPRESS and not action.dest.endswith(".help")}


def _suggestion(name: str, known: set[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


def unknown_config_keys(args: Sequence[str], known: set[str]) -> list[tuple[str, list[str]]]:
    """(file, its unknown keys with suggestions) for each `--config` file in `args` that has any."""
    found = []
    for path in _config_files(args):
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # not readable as YAML: jsonargparse's own message says so
        keys = config_tree_unknowns(tree, known) if isinstance(tree, dict) else []
        if keys:
            found.append((path, [f"{key}{_suggestion(key, known)}" for key in keys]))
    return found


def config_tree_unknowns(tree: dict, known: set[str], prefix: str = "") -> list[str]:
    """Dotted keys of a config tree that name no setting; below a known setting nothing is checked (its value
    may be a dict, e.g. `trainer.logger`'s class_path and init_args)."""
    unknown = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and any(k.startswith(f"{dotted}.") for k in known):
            unknown += config_tree_unknowns(value, known, f"{dotted}.")
        elif dotted not in known:
            unknown.append(dotted)
    return unknown


def _config_files(args: Sequence[str]) -> list[str]:
    args = list(args)
    pairs = zip(args, [*args[1:], ""])
    return [v for a, v in pairs if a in ("-c", "--config") and Path(v).is_file()] + [
        a.partition("=")[2] for a in args if a.startswith("--config=") and Path(a.partition("=")[2]).is_file()]


# -- Lightning's console chatter ----------------------------------------------------------------------------

# Lightning's info lines that ask nothing of the user, by their text; every other line still shows.
LIGHTNING_CHATTER = re.compile(r"GPU available: |TPU available: |💡 Tip: |Seed set to |"
                               r"Loading `train_dataloader` to estimate number of stepping batches|"
                               r"`Trainer\.fit` stopped: `max_steps=|`weights_only` was not set, defaulting to")
# The last: Lightning's line at every checkpoint it writes (codetune's checkpoints hold plain tensors and numbers).
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                     "lightning.pytorch.trainer.connectors.checkpoint_connector")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_CHATTER.search(record.getMessage()) is None


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within: Lightning's chatter lines are dropped, and its `_pytree` deprecation warning (a torch API
    Lightning itself uses; nothing for the user to change)."""
    chatter = _DropChatter()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(chatter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"))
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(chatter)


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
    args = resolve_config_args(sys.argv[1:] if args is None else args)
    with warnings.catch_warnings(), quiet_lightning():
        # `main` always passes the command line explicitly (it strips `prepare`), which Lightning warns about.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _instantiate_cli(args, cli_class, run)


def _instantiate_cli(args: Sequence[str] | None, cli_class: type[CodetuneCLI], run: bool) -> CodetuneCLI:
    return cli_class(
        CodeLoRAModule,
        CodeDataModule,
        args=None if args is None else list(args),
        seed_everything_default=42,
        # fit writes config.yaml itself, when it creates the run directory (before the scan).
        save_config_callback=None,
        # InterruptCheckpoint last: its checkpoint at a step boundary follows every other callback's work of the step.
        trainer_defaults={"callbacks": [ManifestWriter(), RandomState(), InterruptCheckpoint()],
                          "log_every_n_steps": 1},
        auto_configure_optimizers=False,
        run=run,
        parser_kwargs={"prog": cli_class.PROG, "description": cli_class.DESCRIPTION},
    )


def run_fit(args: list[str]) -> int:
    """`codetune fit ...` (args start with `fit`): trains, then prints the run directory as the last line."""
    cli = build_cli(args)
    if cli.subcommand == "fit":
        print(cli.trainer.default_root_dir, flush=True)
    return 0

