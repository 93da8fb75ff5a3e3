"""The data module's arguments, checked as the CLI gives them: every error names its `--data.` flag, shows the
value and says what to use. `CodeDataModule.__init__` runs these before anything is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codetune.data.files import scan_argument_problems
from codetune.data.fim import MiddleMix
from codetune.errors import ConfigError


def check_data_arguments(*, seq_len: int, batch_size: int | str, gradient_accumulation_steps: int,
                         effective_batch_size: int | None, extensions: Sequence[str], ignore_patterns: Sequence[str],
                         val_fraction: float, max_val_windows: int | None, packing: str, fim_rate: float | None,
                         fim_spm_rate: float, fim_middles: MiddleMix, max_file_bytes: int,
                         max_line_length: int) -> None:
    """ConfigError for the first bad value, in the order the flags are listed (the scan's problems all at once)."""
    check_batch(batch_size, gradient_accumulation_steps, effective_batch_size)
    check_positive(seq_len=seq_len)
    problems = scan_argument_problems(extensions, ignore_patterns, max_file_bytes, max_line_length)
    if problems:
        raise ConfigError("; ".join(f"--data.{p}" for p in problems))
    if seq_len < 2:
        raise ConfigError(f"--data.seq_len={seq_len}: a window needs at least 2 tokens.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--data.val_fraction={val_fraction}: use a value in [0, 1), e.g. 0.1.")
    if max_val_windows is not None and max_val_windows < 1:
        raise ConfigError(f"--data.max_val_windows={max_val_windows}: must be a positive integer, or null to "
                          f"validate on every held-out window.")
    if packing not in ("isolated", "concat"):
        raise ConfigError(f"--data.packing={packing!r}: use 'isolated' or 'concat'.")
    for flag, rate in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate),
                       ("fim_line_rate", fim_middles.line_rate), ("fim_block_rate", fim_middles.block_rate)):
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ConfigError(f"--data.{flag}={rate}: use a share in [0, 1], e.g. 0.5.")
    check_middles(fim_middles)


def check_middles(middles: MiddleMix) -> None:
    """--data.fim_line_rate and --data.fim_block_rate share the FIM samples; --data.fim_block_lines is at least 2."""
    if middles.line_rate + middles.block_rate > 1.0:
        raise ConfigError(f"--data.fim_line_rate={middles.line_rate} and --data.fim_block_rate={middles.block_rate} "
                          f"are shares of the same FIM samples: their sum must be at most 1 (the rest are uniform "
                          f"cuts), e.g. 0.25 and 0.25.")
    if middles.block_lines < 2:
        raise ConfigError(f"--data.fim_block_lines={middles.block_lines}: a block has at least 2 lines (one line is "
                          f"--data.fim_line_rate's middle); use e.g. 8.")


def existing_repo(repo: str | None) -> Path:
    """--data.repo as a path to a directory that exists."""
    if repo is None:
        raise ConfigError("--data.repo is required: the repository to train on, e.g. --data.repo ~/code/project "
                          "(make train REPO=~/code/project). There is no default, so that a command run from "
                          "another directory does not train on it; `make demo` passes --data.repo . to train on "
                          "codetune's own source.")
    path = Path(repo).expanduser()
    if not path.exists():
        raise ConfigError(f"--data.repo {repo!r} does not exist. Point it at your repository's root directory.")
    if not path.is_dir():
        raise ConfigError(f"--data.repo {repo!r} is not a directory. Point it at your repository's root directory.")
    return path


def check_batch(batch_size: int | str, accumulation: int, effective: int | None) -> None:
    """--data.batch_size (a positive integer, or 'auto' with --data.effective_batch_size) and the accumulation."""
    if batch_size == "auto":
        if effective is None or effective < 1:
            raise ConfigError(f"--data.batch_size auto needs --data.effective_batch_size N (windows per optimizer "
                              f"step, e.g. 16); got {effective}.")
        return
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--data.batch_size={batch_size}: must be a positive integer or 'auto'.")
    check_positive(gradient_accumulation_steps=accumulation)


def check_positive(**values: int) -> None:
    """ConfigError naming every `--data.<name>` of `values` below 1."""
    bad = [f"--data.{k}={v}" for k, v in values.items() if v < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be a positive integer.")
