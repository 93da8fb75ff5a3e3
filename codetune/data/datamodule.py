"""The LightningDataModule: repository -> files -> token ids -> packed windows -> optimizer batches.

Training files are cut into samples by `codetune.data.fim` (a share of them fill-in-the-middle,
with `--data.fim_rate`; each kept whole inside one window) and packed by
`codetune.data.packing.pack_samples`; validation windows stay left-to-right. Every epoch redraws the
FIM samples' orders and cuts in place (`codetune.data.fim.FimEpochs`): the training batches come
tagged with their epoch, so the collator builds that epoch's windows in whichever process it runs.

Each training batch is one *optimizer* batch of `batch_size x gradient_accumulation_steps` windows;
the LightningModule splits it into micro-batches of `batch_size`. Keeping the split in the module
means an OOM back-off only changes how a batch is cut, never which samples it holds.

Under DDP each rank gets its own share of every optimizer batch (codetune/data/sampler.py): every
window once per epoch across ranks. The data position (epoch, steps done in it) is part of every
checkpoint (`state_dict`), so a run resumed mid-epoch continues with the very next batch. So is the
tokenizer's vocabulary, which a resume must have: the 'tiny' tokenizer is trained once per run
directory, on rank zero, and loaded back from the run's base_model/ whenever it is there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from codetune.data.arguments import check_data_arguments, existing_repo
from codetune.data.files import DEFAULT_EXTENSIONS, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH, ScanResult
from codetune.data.fim import (DEFAULT_FIM_RATE, DEFAULT_MIDDLES, FimEpochs, FimRecord, FimTokens, MiddleMix,
                               NewlineTable, TrainingSamples, fim_families_text, find_fim_tokens, training_samples)
from codetune.data.loader import evenly_spread, window_loader
from codetune.data.packing import PackingMode, Windows, pack_samples, whole_placements
from codetune.data.sampler import steps_per_epoch
from codetune.data.skip_reasons import SkippedFile
from codetune.data.split import DEFAULT_VAL_FRACTION, no_validation_problem, split_paths
from codetune.data.tokens import (CacheStats, load_saved_tiny_tokenizer, load_tokenizer, pad_token_id, tokenize_cached,
                                  tokenize_texts, vocabulary_fingerprint)
from codetune.errors import ConfigError
from codetune.data.model_source import check_model_source
from codetune.data.tokenizer import TINY_NAME, saved_tiny_base, tiny_tokenizer_from_json, train_tokenizer
from codetune.data.training_scan import scan_for_training, scan_report
from codetune.storage import BASE_MODEL_DIR

if TYPE_CHECKING:  # imported where used: transformers' tokenizer classes are slow to import
    from transformers import PreTrainedTokenizerBase

# Held-out windows a validation runs on by default (the reasoning is in CodeDataModule's docstring).
DEFAULT_MAX_VAL_WINDOWS = 256


class CodeDataModule(L.LightningDataModule):
    """Packed windows of a repository's code.

    Args:
        repo: The repository to train on (a directory); required, there is no default (`make demo`
            passes `--data.repo .`). codetune's own output inside it (run directories, `prepare` and
            `merge` outputs, a token cache) is never trained on (`codetune.data.files`).
        tokenizer: The model whose tokenizer is used (linked from --model.name_or_path; 'tiny'
            trains a byte-level BPE tokenizer on the training files, once per run directory: a resume loads
            the one the run saved in base_model/, whatever the repository holds now).
        seq_len: Tokens per window.
        batch_size: Micro-batch: windows per forward/backward pass, or 'auto': the largest that the VRAM
            plan predicts to fit the card (codetune/memory/search.py), with --data.effective_batch_size.
        gradient_accumulation_steps: Micro-batches per optimizer step (effective batch is
            batch_size x gradient_accumulation_steps windows); ignored with batch_size 'auto'.
        effective_batch_size: Windows per optimizer step when batch_size is 'auto' (required then).
        extensions: File extensions to train on (with the dot).
        ignore_patterns: Extra gitignore-style patterns, on top of the built-in ones and .gitignore.
        val_fraction: Share of files held out for validation (file-level, deterministic).
        max_val_windows: Held-out windows that every validation runs on (val/loss, and the base and final held-out
            loss): when the split packs into more, this many at evenly spaced positions through it, the same ones
            each time; null: all of them. The mean loss of a window varies by roughly 0.5 nats across code, so 256
            windows put the standard error of val/loss near 0.03 nats (and the change between two evaluations,
            paired on the same windows, well below it) for about two minutes per validation of a 1.5B 4-bit model
            at 2048 tokens on a 6 GB card; twice the windows cost twice the time for 1/sqrt(2) of the error.
            Compare val/loss only between runs with the same value.
        packing: 'isolated' (no attention across files) or 'concat' (plain concatenation).
        fim_rate: Share of training file pieces turned into fill-in-the-middle samples (`codetune.data.fim`), so the
            model keeps infilling for the editor. Null (the default): 0.5 when the tokenizer has FIM tokens
            (Qwen's `<|fim_prefix|>`..., StarCoder's `<fim_prefix>`..., found by name), else 0 with one warning;
            a rate above 0 with a tokenizer without them is an error. Validation windows stay left-to-right (the
            FIM eval measures infilling), so val/loss compares across rates.
        fim_spm_rate: Share of the FIM samples in SPM order (suffix first); the others are PSM, what editors send.
        fim_line_rate: Share of the FIM samples whose middle is one whole line, drawn anew each epoch: what an editor
            asks for most. Uniform cuts (the samples neither this nor --data.fim_block_rate takes) make mostly long
            middles, after which a small model infills a single line worse than before tuning (docs/fim.md).
        fim_block_rate: Share of the FIM samples whose middle is a block of 2 to --data.fim_block_lines whole lines.
        fim_block_lines: The longest block middle, in lines.
        file_headers: Start every training and validation file (and FIM sample) with the model's repository
            header, `<|file_sep|>path/in/repo.rs` and a newline, so the model learns which code lives where; needs
            a tokenizer with a file separator token (Qwen's `<|file_sep|>`, StarCoder's `<file_sep>`).
        max_file_bytes: Files larger than this are skipped.
        max_line_length: Files with a longer line are treated as minified/generated and skipped.
        tiny_vocab_size: Vocabulary of the tokenizer trained for the 'tiny' model (at a run's first fit).
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
        max_val_windows: int | None = DEFAULT_MAX_VAL_WINDOWS,
        packing: PackingMode = "isolated",
        fim_rate: float | None = None,
        fim_spm_rate: float = 0.5,
        fim_line_rate: float = DEFAULT_MIDDLES.line_rate,
        fim_block_rate: float = DEFAULT_MIDDLES.block_rate,
        fim_block_lines: int = DEFAULT_MIDDLES.block_lines,
        file_headers: bool = False,
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
        self.fim_middles = MiddleMix(fim_line_rate, fim_block_rate, fim_block_lines)
        """How FIM middles are drawn (--data.fim_line_rate, --data.fim_block_rate, --data.fim_block_lines)."""
        check_data_arguments(
            seq_len=seq_len, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            effective_batch_size=effective_batch_size, extensions=extensions, ignore_patterns=ignore_patterns,
            val_fraction=val_fraction, max_val_windows=max_val_windows, packing=packing, fim_rate=fim_rate,
            fim_spm_rate=fim_spm_rate, fim_middles=self.fim_middles, max_file_bytes=max_file_bytes,
            max_line_length=max_line_length)
        self.repo = existing_repo(repo)
        if tokenizer != TINY_NAME:
            # The CLI links --model.name_or_path here (the module checks it as a model, config.json included).
            check_model_source(tokenizer, "--model.name_or_path", tokenizer_only=True)
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.packing = packing
        self.tokenizer = None
        self.vocabulary: str | None = None
        """What the token ids mean (`vocabulary_fingerprint` of the tokenizer); set in `setup`, checkpointed."""
        self.fim_tokens: FimTokens | None = None
        """The tokenizer's fill-in-the-middle sentinels (None: it has none); set in `setup`."""
        self.fim_rate: float | None = None
        """--data.fim_rate as resolved for the tokenizer in `setup` (0 without FIM tokens)."""
        self.fim_records: list[FimRecord] = []
        """Where each FIM training sample came from, in the order they are packed (its cut: epoch 0's)."""
        self.fim_epochs: FimEpochs | None = None
        """The training windows of each epoch: every FIM sample's order and cut drawn anew per epoch."""
        self.train_windows: Windows | None = None
        self.val_windows: Windows | None = None
        """The held-out windows validation runs on: all of them, or --data.max_val_windows evenly spread ones."""
        self.held_out_windows = 0
        """How many windows the held-out files pack into (`val_windows` may be fewer)."""
        self.report: dict[str, Any] = {}
        self.preparing: str | None = None
        """The phase `setup` is in ('phase_1_scan', 'phase_2_tokenize'; None outside it): where a signal stopped
        the run, as the manifest and the stop line say it."""
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
        self.preparing = "phase_1_scan"
        scan = self._scan()
        scan_s = time.perf_counter() - started
        self.preparing = "phase_2_tokenize"
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
        self.tokenizer = self._load_tokenizer(train_texts)
        self.vocabulary = vocabulary_fingerprint(self.tokenizer)
        self.fim_tokens = find_fim_tokens(self.tokenizer)
        self.fim_rate = self._resolve_fim_rate()
        # One batch for both splits: the tokenizer's thread pool gets all the work at once.
        ids, cache = tokenize_cached(self.tokenizer, train_texts + val_texts, self.hparams.cache_dir)
        train_ids, val_ids = ids[:len(train_texts)], ids[len(train_texts):]
        train = self._samples(train_paths, train_ids, cache.directory)
        val = self._samples(val_paths, val_ids, cache.directory, fim=False)
        self.fim_records = train.records
        pad = pad_token_id(self.tokenizer)
        self.train_windows = pack_samples(train.stream, train.whole, self.seq_len, pad, self.packing)
        self.fim_epochs = self._fim_epochs(train) if train.whole else None
        held_out = pack_samples(val.stream, val.whole, self.seq_len, pad, self.packing)
        self.held_out_windows = len(held_out)
        self.val_windows = evenly_spread(held_out, self.hparams.max_val_windows)
        tokenize_s = time.perf_counter() - started
        self.report = self._report(scan, train_paths, val_paths, train, val, cache, scan_s, tokenize_s)
        self.preparing = None
        fim = self.report["phase_2_tokenize"]["fim"]
        rank_zero_info(
            f"codetune data: {len(train_paths)} train / {len(val_paths)} val files, "
            f"{len(self.train_windows)} train / {len(self.val_windows)} val windows of {self.seq_len} tokens"
            + (f" (of {self.held_out_windows} held out: --data.max_val_windows)"
               if len(self.val_windows) < self.held_out_windows else "")
            + (f"; fill-in-the-middle: {fim['fim']} of {fim['pieces']} training pieces ({fim['psm']} PSM, "
               f"{fim['spm']} SPM)" if self.fim_rate else "")
        )

    def _fim_epochs(self, train: TrainingSamples) -> FimEpochs:
        """Every epoch's training windows, each FIM sample cut anew (`train`: the training split's samples)."""
        placements = whole_placements([len(w) for w in train.whole], self.seq_len)
        return FimEpochs(self.train_windows.input_ids, placements, train.fim_pieces, self.fim_tokens,
                         self.tokenizer.eos_token_id, self.hparams.seed, self.hparams.fim_spm_rate, self.fim_middles)

    def _load_tokenizer(self, train_texts: list[str]) -> PreTrainedTokenizerBase:
        """--data.tokenizer's tokenizer. In a fit of the 'tiny' model: the one the run directory saved with its base
        model (`codetune.model.tiny`) once there is one, else one trained on rank zero and sent to every rank."""
        hp = self.hparams
        trainer = self.trainer  # None outside a fit (`codetune prepare`): nothing saved to reuse, one process
        if hp.tokenizer != TINY_NAME or trainer is None:
            return load_tokenizer(hp.tokenizer, train_texts, hp.trust_remote_code, hp.tiny_vocab_size,
                                  revision=hp.revision)
        saved = saved_tiny_base(Path(trainer.default_root_dir))
        if saved is not None:
            tokenizer = load_saved_tiny_tokenizer(saved)
            rank_zero_info(f"codetune data: the 'tiny' tokenizer is the one saved in {saved} ({len(tokenizer)} "
                           f"tokens), not trained again: the model learned its token ids.")
            return tokenizer
        trained = train_tokenizer(train_texts, vocab_size=hp.tiny_vocab_size) if trainer.is_global_zero else None
        # One tokenizer for all ranks: the windows of every rank and the base model rank zero saves share its ids.
        shared = trainer.strategy.broadcast(trained.backend_tokenizer.to_str() if trained is not None else None)
        return trained if trained is not None else tiny_tokenizer_from_json(shared)

    def _resolve_fim_rate(self) -> float:
        """--data.fim_rate for this tokenizer: the default is on with FIM tokens and off (said once) without."""
        asked = self.hparams.fim_rate
        if self.fim_tokens is not None:
            return DEFAULT_FIM_RATE if asked is None else asked
        looked_for = f"looked for {fim_families_text()}"
        if asked:
            raise ConfigError(
                f"--data.fim_rate={asked}: the tokenizer of {self.hparams.tokenizer!r} has no fill-in-the-middle "
                f"tokens ({looked_for}). Train a code model that has them (e.g. Qwen/Qwen2.5-Coder-1.5B), or set "
                f"--data.fim_rate 0 to train left-to-right only.")
        if asked is None:
            rank_zero_warn(f"codetune: the tokenizer of {self.hparams.tokenizer!r} has no fill-in-the-middle tokens "
                           f"({looked_for}), so this run trains left-to-right only and has no FIM eval. Set "
                           f"--data.fim_rate 0 to say that is what you want.")
        return 0.0

    def _samples(self, paths: list[str], ids: list[np.ndarray], cache_dir: str | None,
                 fim: bool = True) -> TrainingSamples:
        """A split's samples: FIM pieces at --data.fim_rate when `fim` (training), headers with --data.file_headers;
        the tokenizer's line-break table is kept in its token cache directory `cache_dir` (None: no cache)."""
        rate = self.fim_rate if fim else 0.0
        return training_samples(paths, ids, self.tokenizer.eos_token_id, self.seq_len, self.hparams.seed, rate,
                                self.hparams.fim_spm_rate, self.fim_tokens,
                                NewlineTable.of(self.tokenizer, cache_dir) if rate else None, self._headers(paths),
                                self.fim_middles)

    def _headers(self, paths: list[str]) -> list[np.ndarray] | None:
        """`<|file_sep|>path` and a newline per file, as token ids (None without --data.file_headers)."""
        if not self.hparams.file_headers:
            return None
        if self.fim_tokens is None or self.fim_tokens.file_sep is None:
            raise ConfigError(
                f"--data.file_headers true: the tokenizer of {self.hparams.tokenizer!r} has no repository file "
                f"separator token (Qwen's <|file_sep|>, StarCoder's <file_sep>). Set --data.file_headers false.")
        separator = np.array([self.fim_tokens.file_sep], dtype=np.int32)
        return [np.concatenate((separator, ids)) for ids in tokenize_texts(self.tokenizer, [f"{p}\n" for p in paths])]

    def _scan(self) -> ScanResult:
        hp = self.hparams
        return scan_for_training(self.repo, hp.extensions, hp.ignore_patterns, hp.max_file_bytes, hp.max_line_length)

    def _report(self, scan: ScanResult, train_paths, val_paths, train: TrainingSamples, val: TrainingSamples,
                cache: CacheStats, scan_s: float, tokenize_s: float) -> dict[str, Any]:
        return {
            "phase_1_scan": scan_report(scan, scan_s),
            "phase_2_tokenize": {
                "tokenizer": self.hparams.tokenizer,
                "train_files": len(train_paths),
                "val_files": len(val_paths),
                "train_tokens": _tokens(train),
                "val_tokens": _tokens(val),
                "train_windows": len(self.train_windows),
                "val_windows": self.held_out_windows,
                "val_windows_used": len(self.val_windows),
                "seq_len": self.seq_len,
                "packing": self.packing,
                "packing_efficiency": round(self.train_windows.efficiency, 5),
                "fim": {"rate": self.fim_rate, "spm_rate": self.hparams.fim_spm_rate,
                        "middles": self.fim_middles._asdict(),
                        "tokens": self.fim_tokens.names() if self.fim_tokens else None,
                        "file_headers": self.hparams.file_headers, **train.counts()},
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
        return self._loader(self.train_windows, shuffle=True, epoch=epoch, start_step=start, fim_epochs=self.fim_epochs)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation windows (the held-out loss sums the shares of all ranks)."""
        # The module cuts every batch into micro-batches (which an OOM back-off may shrink).
        return self._loader(self.val_windows, shuffle=False)

    def _loader(self, windows: Windows, shuffle: bool, epoch: int = 0, start_step: int = 0,
                fim_epochs: FimEpochs | None = None) -> DataLoader:
        replicas, rank = self._replicas()
        return window_loader(windows, self.packing, self.optimizer_batch_size, shuffle, self.hparams.seed,
                             self.hparams.num_workers, replicas, rank, epoch, start_step, fim_epochs)

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
                "world_size": trainer.world_size, "fim_samples": len(self.fim_records),
                "vocabulary": self.vocabulary}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_same_vocabulary(state_dict.get("vocabulary"))
        self._resume_position = dict(state_dict) if state_dict else None

    def _check_same_vocabulary(self, trained: str | None) -> None:
        """The checkpoint's weights learned what the ids of its tokenizer mean: a resume must tokenize with the same
        vocabulary (None: a checkpoint from before it was recorded). A 'tiny' tokenizer is trained once per run
        directory, so a checkpoint resumed into another directory after its repository changed would not."""
        if trained is None or trained == self.vocabulary:
            return
        if self.hparams.tokenizer == TINY_NAME:
            fix = (f"A 'tiny' run keeps its tokenizer in its run directory's {BASE_MODEL_DIR}/: resume in the run "
                   f"directory the checkpoint came from (--run_name <that run> --ckpt_path last, or make resume "
                   f"RUN=<run dir>)")
        else:
            fix = "Resume with the --model.name_or_path and --model.revision the checkpoint was trained with"
        raise ConfigError(f"--ckpt_path: the checkpoint was trained with another vocabulary than this run's tokenizer "
                          f"has (fingerprint {trained}, now {self.vocabulary}), so its token ids would stand for other "
                          f"tokens. {fix}, or start a new run without --ckpt_path.")

    def _start_position(self) -> tuple[int, int]:
        """(epoch, steps to skip) for the first training epoch of this fit: (0, 0) unless resuming."""
        saved, self._resume_position = self._resume_position, None
        if not saved:
            return 0, 0
        now = {"train_windows": len(self.train_windows), "optimizer_batch_size": self.optimizer_batch_size,
               "world_size": self._replicas()[0], "fim_samples": len(self.fim_records)}
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            rank_zero_warn("codetune: resuming with different data or batching than the checkpoint ("
                           + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                           + "); the step count continues, but the batches are not the ones the run would have seen.")
        epoch, done = saved["epoch"], saved["steps_done"]
        if done >= steps_per_epoch(now["train_windows"], self.optimizer_batch_size, now["world_size"]):
            return epoch + 1, 0
        return epoch, done


def _tokens(samples: TrainingSamples) -> int:
    """Tokens of a split's samples: EOS, FIM sentinels and file headers included."""
    return int(sum(map(len, samples.stream)) + sum(map(len, samples.whole)))
