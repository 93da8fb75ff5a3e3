"""The LightningDataModule: repository -> files -> token ids -> packed windows -> optimizer batches.

Each training batch is one *optimizer* batch of `batch_size x gradient_accumulation_steps` windows;
the LightningModule splits it into micro-batches of `batch_size`. Keeping the split in the module
means an OOM back-off only changes how a batch is cut, never which samples it holds.

Under DDP each rank gets its own share of every optimizer batch (codetune/data/sampler.py): every
window once per epoch across ranks. The data position (epoch, steps done in it) is part of every
checkpoint (`state_dict`), so a run resumed mid-epoch continues with the very next batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from codetune.data.files import (DEFAULT_EXTENSIONS, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH, ScanResult,
                                 SkippedFile, scan_argument_problems, scan_repository)
from codetune.data.packing import PackingMode, Windows, pack_windows, window_labels
from codetune.data.sampler import WindowBatchSampler, steps_per_epoch
from codetune.data.split import DEFAULT_VAL_FRACTION, no_validation_problem, split_paths
from codetune.data.tokens import CacheStats, load_tokenizer, pad_token_id, tokenize_cached
from codetune.errors import ConfigError

# Places per secret kind that phase_1_scan names (`secrets_redacted` has the full count).
SECRET_LOCATIONS_RECORDED = 20


class WindowDataset(Dataset):
    """Window `i` of a split, with its index as the sample id."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int | list[int]) -> int | list[int]:
        # The sampler yields whole batches (lists of indices); the collator turns them into tensors.
        return index


class WindowCollator:
    """Builds model inputs for a list of window indices (picklable, for worker processes)."""

    def __init__(self, windows: Windows, packing: PackingMode) -> None:
        self.windows = windows
        self.packing = packing

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)  # an empty list too (a rank with no window in a step)
        input_ids = self.windows.input_ids[idx]
        position_ids = self.windows.position_ids[idx]
        labels = window_labels(input_ids, position_ids, self.windows.n_real[idx], self.packing)
        return {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "sample_ids": torch.from_numpy(idx.astype(np.int64)),
        }


class CodeDataModule(L.LightningDataModule):
    """Packed windows of a repository's code.

    Args:
        repo: The repository to train on (a directory); required, there is no default (`make demo`
            passes `--data.repo .`). codetune's own output inside it (run directories, `prepare` and
            `merge` outputs, a token cache) is never trained on (`codetune.data.files`).
        tokenizer: The model whose tokenizer is used (linked from --model.name_or_path; 'tiny'
            trains a byte-level BPE tokenizer on the training files).
        seq_len: Tokens per window.
        batch_size: Micro-batch: windows per forward/backward pass, or 'auto': the largest that the VRAM
            plan predicts to fit the card (codetune/memory_plan.py), with --data.effective_batch_size.
        gradient_accumulation_steps: Micro-batches per optimizer step (effective batch is
            batch_size x gradient_accumulation_steps windows); ignored with batch_size 'auto'.
        effective_batch_size: Windows per optimizer step when batch_size is 'auto' (required then).
        extensions: File extensions to train on (with the dot).
        ignore_patterns: Extra gitignore-style patterns, on top of the built-in ones and .gitignore.
        val_fraction: Share of files held out for validation (file-level, deterministic).
        packing: 'isolated' (no attention across files) or 'concat' (plain concatenation).
        max_file_bytes: Files larger than this are skipped.
        max_line_length: Files with a longer line are treated as minified/generated and skipped.
        tiny_vocab_size: Vocabulary of the tokenizer trained for the 'tiny' model.
        trust_remote_code: Passed to the tokenizer loader (linked from --model.trust_remote_code).
        revision: Hub revision of the tokenizer (linked from --model.revision).
        cache_dir: Where token ids are cached, keyed by tokenizer and file content, so an unchanged
            file is never tokenized twice (see `codetune.data.tokens`); null disables the cache.
        seed: Seed of the file split and of the window shuffle.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        repo: str | None = None,
        tokenizer: str = "tiny",
        seq_len: int = 2048,
        batch_size: int | Literal["auto"] = 8,
        gradient_accumulation_steps: int = 2,
        effective_batch_size: int | None = None,
        extensions: list[str] = list(DEFAULT_EXTENSIONS),
        ignore_patterns: list[str] = [],
        val_fraction: float = DEFAULT_VAL_FRACTION,
        packing: PackingMode = "isolated",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        tiny_vocab_size: int = 2048,
        trust_remote_code: bool = False,
        revision: str | None = None,
        cache_dir: str | None = "~/.cache/codetune",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_batch(batch_size, gradient_accumulation_steps, effective_batch_size)
        _check_positive(seq_len=seq_len)
        problems = scan_argument_problems(extensions, ignore_patterns, max_file_bytes, max_line_length)
        if problems:
            raise ConfigError("; ".join(f"--data.{p}" for p in problems))
        if seq_len < 2:
            raise ConfigError(f"--data.seq_len={seq_len}: a window needs at least 2 tokens.")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"--data.val_fraction={val_fraction}: use a value in [0, 1), e.g. 0.1.")
        if packing not in ("isolated", "concat"):
            raise ConfigError(f"--data.packing={packing!r}: use 'isolated' or 'concat'.")
        self.repo = _existing_dir(repo)
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.packing = packing
        self.tokenizer = None
        self.train_windows: Windows | None = None
        self.val_windows: Windows | None = None
        self.report: dict[str, Any] = {}
        self.split_files: dict[str, list[str]] = {}
        """Relative paths of the files in each split ("train", "val"), in window order."""
        self.skipped: list[SkippedFile] = []
        """What the scan left out, and why."""
        self.val_sources: list[tuple[str, str, str]] = []
        """(path, language, text) of the held-out files, for the completion eval (callbacks/generation_eval.py)."""
        self._resume_position: dict[str, int] | None = None

    # -- preparation -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.train_windows is not None:
            return
        started = time.perf_counter()
        scan = self._scan()
        scan_s = time.perf_counter() - started
        by_path = {f.rel_path: f for f in scan.files}
        train_paths, val_paths = split_paths(list(by_path), self.hparams.val_fraction, self.hparams.seed)
        self.split_files = {"train": train_paths, "val": val_paths}
        problem = no_validation_problem(len(by_path), len(val_paths), self.hparams.val_fraction)
        if problem:
            rank_zero_warn(f"codetune: --data.repo {str(self.repo)!r}: {problem}")
        self.val_sources = [(p, by_path[p].language, by_path[p].text) for p in val_paths]
        self.skipped = scan.skipped
        train_texts = [by_path[p].text for p in train_paths]
        val_texts = [by_path[p].text for p in val_paths]

        started = time.perf_counter()
        self.tokenizer = load_tokenizer(self.hparams.tokenizer, train_texts, self.hparams.trust_remote_code,
                                        self.hparams.tiny_vocab_size, revision=self.hparams.revision)
        # One batch for both splits: the tokenizer's thread pool gets all the work at once.
        ids, cache = tokenize_cached(self.tokenizer, train_texts + val_texts, self.hparams.cache_dir)
        train_ids, val_ids = ids[:len(train_texts)], ids[len(train_texts):]
        eos, pad = self.tokenizer.eos_token_id, pad_token_id(self.tokenizer)
        self.train_windows = pack_windows(train_ids, self.seq_len, eos, pad, self.packing)
        self.val_windows = pack_windows(val_ids, self.seq_len, eos, pad, self.packing)
        tokenize_s = time.perf_counter() - started
        self.report = self._report(scan, train_paths, val_paths, train_ids, val_ids, cache, scan_s, tokenize_s)
        rank_zero_info(
            f"codetune data: {len(train_paths)} train / {len(val_paths)} val files, "
            f"{len(self.train_windows)} train / {len(self.val_windows)} val windows of {self.seq_len} tokens"
        )

    def _scan(self) -> ScanResult:
        scan = scan_repository(self.repo, self.hparams.extensions, self.hparams.ignore_patterns,
                               self.hparams.max_file_bytes, self.hparams.max_line_length)
        if not scan.files:
            counts = scan.skip_counts()
            why = (f"all {sum(counts.values())} candidate files were skipped ({_format_counts(counts)})"
                   if counts else f"no file has one of the extensions {self.hparams.extensions}")
            raise ConfigError(
                f"--data.repo {str(self.repo)!r}: nothing to train on: {why}. Check --data.extensions "
                f"and --data.ignore_patterns, or run `codetune inspect {self.repo}`."
            )
        return scan

    def _report(self, scan: ScanResult, train_paths, val_paths, train_ids, val_ids, cache: CacheStats,
                scan_s: float, tokenize_s: float) -> dict[str, Any]:
        return {
            "phase_1_scan": {
                "files_kept": len(scan.files),
                "files_skipped": scan.skip_counts(),
                "secrets_redacted": dict(scan.secrets_redacted),
                "secret_locations": scan.secret_locations(SECRET_LOCATIONS_RECORDED),
                "lines": int(sum(f.n_lines for f in scan.files)),
                "wall_s": round(scan_s, 3),
            },
            "phase_2_tokenize": {
                "tokenizer": self.hparams.tokenizer,
                "train_files": len(train_paths),
                "val_files": len(val_paths),
                "train_tokens": int(sum(len(t) + 1 for t in train_ids)),
                "val_tokens": int(sum(len(t) + 1 for t in val_ids)),
                "train_windows": len(self.train_windows),
                "val_windows": len(self.val_windows),
                "seq_len": self.seq_len,
                "packing": self.packing,
                "packing_efficiency": round(self.train_windows.efficiency, 5),
                "cache_hits": cache.hits,
                "cache_misses": cache.misses,
                "cache_dir": cache.directory,
                "wall_s": round(tokenize_s, 3),
            },
        }

    # -- loaders -------------------------------------------------------------------------------

    @property
    def optimizer_batch_size(self) -> int:
        if self.batch_size == "auto":
            return self.hparams.effective_batch_size
        return self.batch_size * self.gradient_accumulation_steps

    def train_dataloader(self) -> DataLoader:
        if not len(self.train_windows):
            raise ConfigError(f"--data.repo {str(self.repo)!r}: no training windows (no training files).")
        epoch, start = self._start_position()
        return self._loader(self.train_windows, shuffle=True, epoch=epoch, start_step=start)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation windows (the held-out loss sums the shares of all ranks)."""
        # The module cuts every batch into micro-batches (which an OOM back-off may shrink).
        return self._loader(self.val_windows, shuffle=False)

    def _loader(self, windows: Windows, shuffle: bool, epoch: int = 0, start_step: int = 0) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = WindowBatchSampler(len(windows), self.optimizer_batch_size, shuffle, self.hparams.seed,
                                     num_replicas=replicas, rank=rank, epoch=epoch, start_step=start_step)
        # Its own generator: creating an iterator must not draw from the global RNG, which dropout uses
        # (a resumed run restores that RNG and must see the same draws).
        return DataLoader(WindowDataset(windows), sampler=sampler, batch_size=None,
                          collate_fn=WindowCollator(windows, self.packing), num_workers=self.hparams.num_workers,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer  # None until the data module is attached to a trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    # -- data position (checkpointed) ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: Lightning saves this in every checkpoint."""
        trainer = self.trainer
        if trainer is None or self.train_windows is None:
            return {}
        return {"epoch": trainer.current_epoch,
                # Batches whose training step ran in this epoch (a checkpoint is saved after the step).
                "steps_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "train_windows": len(self.train_windows), "optimizer_batch_size": self.optimizer_batch_size,
                "world_size": trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = dict(state_dict) if state_dict else None

    def _start_position(self) -> tuple[int, int]:
        """(epoch, steps to skip) for the first training epoch of this fit: (0, 0) unless resuming."""
        saved, self._resume_position = self._resume_position, None
        if not saved:
            return 0, 0
        now = {"train_windows": len(self.train_windows), "optimizer_batch_size": self.optimizer_batch_size,
               "world_size": self._replicas()[0]}
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            rank_zero_warn("codetune: resuming with different data or batching than the checkpoint ("
                           + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                           + "); the step count continues, but the batches are not the ones the run would have seen.")
        epoch, done = saved["epoch"], saved["steps_done"]
        if done >= steps_per_epoch(now["train_windows"], self.optimizer_batch_size, now["world_size"]):
            return epoch + 1, 0
        return epoch, done


def _existing_dir(repo: str | None) -> Path:
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


def _check_batch(batch_size: int | str, accumulation: int, effective: int | None) -> None:
    if batch_size == "auto":
        if effective is None or effective < 1:
            raise ConfigError(f"--data.batch_size auto needs --data.effective_batch_size N (windows per optimizer "
                              f"step, e.g. 16); got {effective}.")
        return
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--data.batch_size={batch_size}: must be a positive integer or 'auto'.")
    _check_positive(gradient_accumulation_steps=accumulation)


def _check_positive(**values: int) -> None:
    bad = [f"--data.{k}={v}" for k, v in values.items() if v < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be a positive integer.")


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
