"""The GPU check: what codetune promises on a small card, measured in one command and printed as one table.

Run from the repository root on a CUDA machine::

    python bench/gpu_check.py --out gpu_check.json            # or: make gpu-check
    python bench/gpu_check.py --dry-run --out dry.json        # the same sections on CPU, tiny shapes (75 s)
    python bench/gpu_check.py --sections a,d                  # a subset (a rerun on a short lease)

**Time.** Not yet measured on a card; what bounds it is the budget. `--budget-s` (480 s by default) is
shared between the sections run in the proportions of `SECTION_BUDGET_S` (all seven: Turing path 70 s,
training 170, OOM 60, fp16 50, isolation 35, generate/merge 50, GPU tests 45; `--sections a` gives section a
all of it). Before
each unit of work (a fit, a row) a section checks its share and the total: when either is spent, the units
left become `skipped: budget` rows that name the section's cap, the seconds spent and what was not run, and
a section that starts after the total is spent is one such row. A unit already running is not interrupted:
a fit cannot be stopped mid-run, so a section overruns its share by at most the last unit it started (the
GPU tests' subprocess alone is stopped, at the section's time left). Outside the budget are the imports, the setup
(its seconds are in the setup row) and the final table: a 600 s command keeps 2 minutes for them, that
overrun and copying the results back. The dry run's wall time and each section's share are in
bench/README.md.

**Model.** A randomly initialised model of the real Qwen2.5-Coder-1.5B architecture (hidden 1536, 28
layers, 12 query / 2 key-value heads of 128, MLP 8960, vocabulary 151,936, tied embeddings; from
`bench/models/qwen2.5-coder-1.5b/config.json` when that file exists, else from the same values in
code), saved in bf16 with `save_pretrained` into a temporary directory together with a byte-level BPE
tokenizer trained on the corpus (`codetune.model.tiny.train_tokenizer`, 8,192 tokens). The model's
vocabulary stays 151,936, larger than the tokenizer's: every token id is below it, which the setup row
checks on the packed windows. No weights are downloaded; the figures that depend on the weights (loss
values) are a random model's, the ones that depend on the shapes (memory, speed) are the real model's.
`--dry-run` uses a tiny Qwen2 (hidden 64, 2 layers, 4/2 heads of 16, vocabulary 1,024 for a 512-token
tokenizer) and windows of 64 tokens on CPU.

**Corpus.** This repository's own source (`codetune/`, `callbacks/`, `tests/`, `bench/`), or `--corpus
DIR` (e.g. /usr/share/cargo/registry), copied into the work directory as often as the longest run needs
(each copy with extra trailing newlines so the duplicate filter keeps it).

**Memory cap.** `torch.cuda.set_per_process_memory_fraction` caps torch's allocator at the emulated
card (`--card-gib`, 6) minus the CUDA context this process already holds (measured: a 6 GiB card's
context takes its share of those 6 GiB, and the allocator's cap does not count it).

Every training run goes through the real CLI in this process, `codetune.cli.build_cli(["fit", ...])`
(what `codetune fit` runs), with the flags of `COMMON_FIT_FLAGS` (among them no generation at all: no
language, repo or FIM prompts; the base eval still measures the held-out loss) and each row's overrides, plus a
`StepRecorder` callback (`--trainer.callbacks+=`) that records each optimizer step's loss, wall time,
tokens and micro-batch and the trainable weights' update. Sections, each one or more rows:

t. **The Turing path on this card**: the Rust config at its own micro-batch (4 x 4096, checkpointing) as an RTX
   2060 trains it, on whatever card is here. codetune sees compute capability 7.5 (`emulated_turing`: its
   dtype, attention kernels and VRAM plan are Turing's), torch's flash and cuDNN SDPA kernels are off as a
   Turing card has none, `--model.dtype float16` trains under 16-mixed with a GradScaler (the residual stream
   scaled), and the allocator is capped at the 6 GiB card. Every SDPA call is recorded with the kernel torch's
   dispatcher picks for it (`codetune.model.attention.record_sdpa_calls`): the count of math-kernel calls must
   be 0, the losses finite, no OOM back-off, and the peak within 10% of the plan; tokens/s is reported. On the
   CPU (dry run) the same fit runs in fp32 and each call is replayed through torch's rules for 7.5
   (`codetune.model.kernels.torch_choice`).

a. **Training** with `configs/training_config_rust.yaml` (4 x 4096, NF4, r16, checkpointing, 8-bit AdamW)
   and `configs/training_config.yaml` (8 x 2048), each as shipped on the whole card and on the
   emulated card at the largest micro-batch the VRAM plan fits (`codetune.memory.plan.
   largest_micro_batch`, effective batch kept; the default config with checkpointing on when nothing fits
   without, as the README advises). Figures: peak allocated, reserved and NVML-used memory (the
   manifest's `phase_4_training.vram`, read every step from the first training step on) against the plan
   (`phase_3_model.vram_plan`); the ratio is allocated / (plan - CUDA context), the plan's own error
   target, and must be within 10%. Training tokens/s over the steps after the first (the first pays for
   kernel selection and the allocator's growth); the training loss finite at every step, and the held-out
   loss falling: the base's (adapter off, before the first step) against the tuned one's after the last,
   on the same windows of a few held-out files (`--data.val_fraction 0.03`; a random base's training
   losses differ more between batches than a few steps change them). `--model.warmup_steps 0`, so the
   first step already learns.
   MFU = FLOPs per token x tokens/s / the card's dense 16-bit peak (`DENSE_16BIT_PEAK_TFLOPS`; "unknown"
   for other cards). FLOPs per token of a frozen-base LoRA step, with N the decoder's projection
   weights (all layers), V h the (tied) output head, r-rank adapters of N_lora values, s the window::

       forward            2 N + 2 V h + 2 L n_heads d_head s        (attention: QK^T and AV, causal: s/2 keys)
       backward           2 N + 2 V h + 4 L n_heads d_head s        (input gradients only: the base is frozen)
       LoRA               6 N_lora                                   (forward, input and weight gradients)
       MFU counts those; HFU adds what is computed twice: the head in the chunked loss's backward (2 V h)
       and, with checkpointing, every layer's forward (2 N + 2 L n_heads d_head s + 2 N_lora).

   Packed windows make attention block-diagonal; the kernels still run the causal window, which is what
   is counted.
b. **A real OOM.** The Rust config with dropout 0 under an allocator cap halfway between the plans of its
   micro-batch and of half of it (without their CUDA context term, scaled by section a's measured/planned
   ratio for that config on the card when it ran): the first attempt runs out of memory,
   `callbacks/oom_backoff.py` redoes the step at half the micro-batch, and the run ends with the same loss
   as one started at that micro-batch (relative tolerance `OOM_LOSS_RTOL`: 5e-3 in 16-bit, where the
   accumulation order differs; 1e-5 in fp32, where the adapters are compared too). On CPU the OOM is
   injected at the first step (`CODETUNE_INJECT_OOM=0`).
c. **The Turing path forced**: `--model.dtype float16` (the CLI then trains 16-mixed: a GradScaler, fp32
   LoRA weights) against `--model.dtype bfloat16`, same seed and batches, dropout 0: losses finite, the
   scaler present, and the adapters' update norms in ratio 1 +- 0.1 with cosine >= 0.9 (a scaler that
   skipped steps moves the weights less). On CPU, where Lightning cannot train float16, bf16 against fp32
   (the same comparison), plus the pure choice: compute capability 7.5 gets float16 and 16-mixed.
d. **Packed-window isolation at batch > 1**, through the module's own decoder path
   (`CodeLoRAModule.hidden_states`, NF4 + LoRA on CUDA): the logits of every file segment inside a batch of
   packed windows equal those of the segment alone, within `ISOLATION_RTOL` of the logits' scale (bf16:
   3e-2, fp32: 1e-4), for sdpa, eager, and flash_attention_2 when `flash_attn` imports; a control run with
   positions that run across files (concat packing) must differ by more, or the row is "inconclusive".
e. **`codetune generate`** (NF4 on CUDA) and **`codetune merge`** on a trained run of section a, through
   `codetune.__main__.main`; the merged model's logits equal the unquantized base + adapter's (bf16: within
   2e-2 of their scale; fp32: 1e-4), and the adapter moves them by at least 3 times that ("inconclusive"
   otherwise: a merge that dropped the update would pass too). The merge itself runs on the CPU, by design.
f. **GPU tests**: `pytest -m gpu tests/gpu` (CUDA only).

Output: as setup and then each section ends, a small table of its rows on stdout (flushed), and with `--out
FILE` the JSON rewritten whole (a temporary sibling, then a rename) with every row so far, `setup_s`,
`section_s` (each finished section's seconds), `budget` (the total, and for each section its cap, seconds
spent, whether the budget was hit and what was not run) and `complete` (true only in the last write): a
command stopped by its time limit still leaves the sections it finished. At the end, the full table.
`rows[*].figures` holds every number. Exit status 1 when a row failed. A section that raises becomes a FAIL
row (the traceback goes to stderr) and the next section runs.

A new section is one entry in each of `SECTIONS`, `SECTION_TITLES` and `SECTION_BUDGET_S`; its rows go through
`budgeted`, and its fits through `run_fit`, which checks the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

# The throughput bench's corpus writer, shared (both are scripts in bench/; this one may be loaded by path in tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import write_corpus  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # codetune and callbacks import from the checkout, installed or not

GiB = 2**30
GB = 10**9
SOURCE_DIRS = ("codetune", "callbacks", "tests", "bench")
MODEL_CONFIG_FILE = REPO_ROOT / "bench" / "models" / "qwen2.5-coder-1.5b" / "config.json"
RUST_CONFIG = REPO_ROOT / "configs" / "training_config_rust.yaml"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "training_config.yaml"
EFFECTIVE_BATCH = 16
# Tokens of corpus per token a run trains: no run may reach an epoch end inside its steps.
CORPUS_MARGIN = 1.2

# Qwen2.5-Coder-1.5B's architecture (its config.json on the hub), used when MODEL_CONFIG_FILE is absent.
QWEN_CODER_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=32768, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu",
)
TINY_QWEN2 = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=32768, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu",
)

# Every `codetune fit` flag the check relies on, in one place: the CLI changes under other issues.
COMMON_FIT_FLAGS = {
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "trainer.max_epochs": "-1",
    # A few held-out files: the base's held-out loss before the first step and the tuned one after the last are
    # measured on the same windows, so "falling" is not the noise between training batches.
    "data.val_fraction": "0.03",
    # No generation in any fit: a random model's completions and infills run to the token cap (512 for Rust) over
    # a 151,936 vocabulary, minutes per eval. The base eval stays for its held-out loss, which generates nothing.
    "generation.prompts": "[]",
    "generation.repo_prompts": "0",
    "generation.fim_prompts": "0",
    "generation.base_eval": "true",
    "checkpoint_every_n_steps": "0",
    "vram.log_every_n_steps": "1",             # a VRAM reading after every step: the peaks are exact
    "model.warmup_steps": "0",                 # the first step learns, so a few steps show the loss falling
    "seed_everything": "42",
}
DTYPE_FLAG = "model.dtype"
DROPOUT_FLAG = "model.lora_dropout"

# Dense (no sparsity) 16-bit tensor-core peaks, TFLOP/s, matched by a fragment of the CUDA device name, in order.
DENSE_16BIT_PEAK_TFLOPS = (
    ("H200", 989.4, "bf16 dense, SXM"),
    ("H100 PCIe", 756.0, "bf16 dense"),
    ("H100", 989.4, "bf16 dense, SXM"),
    ("A100", 312.0, "bf16 dense"),
    ("RTX 4090", 165.2, "bf16 dense, fp32 accumulate"),
    ("RTX 3090", 71.0, "bf16 dense, fp32 accumulate"),
    ("RTX 2060", 51.6, "fp16 tensor with fp16 accumulate (no bf16); half that with fp32 accumulate"),
    ("T4", 65.0, "fp16 tensor (no bf16)"),
)
PLAN_TOLERANCE = 0.10
OOM_LOSS_RTOL = {16: 5e-3, 32: 1e-5}
ISOLATION_RTOL = {16: 3e-2, 32: 1e-4}
MERGE_RTOL = {16: 2e-2, 32: 1e-4}
UPDATE_RATIO_TOLERANCE = 0.10
UPDATE_MIN_COSINE = 0.9
# A control must differ by this many tolerances for an isolation row to mean anything.
CONTROL_FACTOR = 3.0
PASS, FAIL, INCONCLUSIVE = "pass", "FAIL", "inconclusive"
NEEDS_CUDA = "skipped: needs CUDA"
SKIPPED_BUDGET = "skipped: budget"

# Each section's share of --budget-s, in seconds at the default total (the shares of the sections run are scaled to
# the total): one 600 s device command then keeps ~2 minutes for the imports, the setup, the one unit of work a
# cap cannot stop, and copying the results back.
DEFAULT_BUDGET_S = 480.0
SECTION_BUDGET_S = {"t": 70.0, "a": 170.0, "b": 60.0, "c": 50.0, "d": 35.0, "e": 50.0, "f": 45.0}


# -- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """The sizes of one check: the real shapes on CUDA, or tiny ones on CPU (`--dry-run`)."""

    dry_run: bool
    model_config: dict[str, Any]
    tokenizer_vocab: int
    seq_len: int | None
    """Window for every run (None: each config's own)."""
    train_steps: int
    oom_steps: int
    precision_steps: int
    precision_window: dict[str, str]
    """Overrides of section c (a short window: it checks numbers, not memory)."""
    isolation_seq_len: int
    isolation_rows: int
    card_gib: float

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")


def real_mode(card_gib: float) -> Mode:
    config = json.loads(MODEL_CONFIG_FILE.read_text()) if MODEL_CONFIG_FILE.is_file() else dict(QWEN_CODER_1_5B)
    return Mode(dry_run=False, model_config=config, tokenizer_vocab=8192, seq_len=None, train_steps=3,
                oom_steps=3, precision_steps=4,
                precision_window={"data.seq_len": "1024", "data.batch_size": "4",
                                  "data.gradient_accumulation_steps": "4"},
                isolation_seq_len=1024, isolation_rows=3, card_gib=card_gib)


def dry_mode(card_gib: float) -> Mode:
    return Mode(dry_run=True, model_config=dict(TINY_QWEN2), tokenizer_vocab=512, seq_len=64, train_steps=3,
                oom_steps=3, precision_steps=3, precision_window={}, isolation_seq_len=64, isolation_rows=3,
                card_gib=card_gib)


@dataclass(frozen=True)
class FitSpec:
    """One `codetune fit` of the check: a shipped config, overrides (flag without `--` -> value), a cap."""

    name: str
    config: Path
    overrides: dict[str, str] = field(default_factory=dict)
    steps: int = 3
    cap_bytes: int | None = None
    """torch allocator cap for this run (None: the whole card)."""
    env: dict[str, str] = field(default_factory=dict)
    keep_update: bool = False

    def settings(self) -> dict[str, Any]:
        """The run's effective `model.*` / `data.*` values: module defaults < YAML < overrides."""
        from codetune.data.datamodule import CodeDataModule
        from codetune.model.module import CodeLoRAModule

        values = {f"model.{k}": v for k, v in _defaults(CodeLoRAModule).items()}
        values.update({f"data.{k}": v for k, v in _defaults(CodeDataModule).items()})
        values.update(_flatten(yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}))
        values.update({k: yaml.safe_load(v) for k, v in self.overrides.items()})
        return values


def _defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class Row:
    """One line of the table."""

    section: str
    check: str
    status: str
    measured: str = ""
    criterion: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


class BudgetSpent(Exception):
    """A unit of work was not started (or was stopped): its section's cap or the total budget is spent."""

    def __init__(self, what: str, reason: str, figures: dict[str, Any]) -> None:
        super().__init__(f"{reason}; not run: {what}")
        self.what, self.reason, self.figures = what, reason, figures


@dataclass
class Budget:
    """Seconds the sections may take: `total_s` for all of them, and each section a cap (`caps_s`).

    A section calls `check` before each unit of work (a fit, a row); with no time left, in its cap or in the
    total, the unit is not started and `BudgetSpent` says what was not run, which `budgeted` turns into a
    `skipped: budget` row. A unit already started runs to its end: a fit cannot be stopped mid-run, so a section
    overruns its cap by at most its last unit. The clock starts with the first section (setup is outside);
    `clock` is any monotonic seconds function, so a test can advance time by hand.
    """

    total_s: float
    caps_s: dict[str, float]
    clock: Callable[[], float] = time.perf_counter
    spent_s: dict[str, float] = field(default_factory=dict)
    """Seconds each finished section took."""
    not_run: dict[str, list[str]] = field(default_factory=dict)
    """What each section did not run for lack of time (absent: the budget was not hit)."""
    section: str | None = None
    _began: float | None = field(default=None, init=False, repr=False)
    _section_began: float = field(default=0.0, init=False, repr=False)

    @classmethod
    def shared(cls, total_s: float, sections: Sequence[str], clock: Callable[[], float] = time.perf_counter) -> Budget:
        """`total_s` split between `sections` in the proportions of `SECTION_BUDGET_S`."""
        weight = sum(SECTION_BUDGET_S[name] for name in sections)
        return cls(total_s, {name: total_s * SECTION_BUDGET_S[name] / weight for name in sections}, clock)

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(math.inf, {})

    def start(self, section: str) -> None:
        now = self.clock()
        self._began = now if self._began is None else self._began
        self.section, self._section_began = section, now

    def finish(self) -> float:
        """Ends the current section; its seconds."""
        spent = self.section_elapsed_s()
        self.spent_s[self.section] = spent
        self.section = None
        return spent

    def section_elapsed_s(self) -> float:
        return 0.0 if self.section is None else self.clock() - self._section_began

    def total_elapsed_s(self) -> float:
        return 0.0 if self._began is None else self.clock() - self._began

    def left_s(self) -> float:
        """Seconds the current section may still start work in: the least of its cap's and the total's."""
        cap = self.caps_s.get(self.section, math.inf)
        return min(cap - self.section_elapsed_s(), self.total_s - self.total_elapsed_s())

    def check(self, what: str) -> None:
        """Raises `BudgetSpent` when no time is left to start `what`."""
        if self.left_s() <= 0:
            raise self.spent(what)

    def spent(self, what: str) -> BudgetSpent:
        """Records that `what` was not run (or was stopped) and returns the exception that says so."""
        self.not_run.setdefault(self.section, []).append(what)
        cap, elapsed = self.caps_s.get(self.section, math.inf), self.section_elapsed_s()
        reason = f"section {self.section} cap {cap:.0f} s, {elapsed:.0f} s spent"
        if self.total_elapsed_s() >= self.total_s:
            reason += f"; total budget {self.total_s:.0f} s spent ({self.total_elapsed_s():.0f} s)"
        figures = {"cap_s": cap, "spent_s": elapsed, "total_s": self.total_s,
                   "total_spent_s": self.total_elapsed_s(), "not_run": what}
        return BudgetSpent(what, reason, figures)

    def skipped_row(self, check: str, spent: BudgetSpent) -> Row:
        return Row(self.section or "", check, SKIPPED_BUDGET, f"{spent.reason}; not run: {spent.what}",
                   f"--budget-s {self.total_s:g}: this section's share {spent.figures['cap_s']:.0f} s",
                   spent.figures)

    def report(self) -> dict[str, Any]:
        """The budget in the JSON: the total, and each section's cap, seconds spent and what it did not run."""
        sections = {name: {"cap_s": cap, "spent_s": self.spent_s.get(name), "hit": name in self.not_run,
                           "not_run": self.not_run.get(name, [])} for name, cap in self.caps_s.items()}
        return {"total_s": self.total_s, "total_spent_s": self.total_elapsed_s(), "sections": sections}


def budgeted(ctx: Context, check: str, make_row: Callable[[], Row]) -> Row:
    """`make_row()`, or a `skipped: budget` row when the section's time runs out before it or one of its fits."""
    try:
        ctx.budget.check(check)
        return make_row()
    except BudgetSpent as spent:
        _release(ctx)
        return ctx.budget.skipped_row(check, spent)


@dataclass
class Context:
    """What the sections share: the mode, the work directory, the model, the corpus, the runs made and the budget."""

    mode: Mode
    work: Path
    model_dir: Path
    corpus: Path
    context_bytes: int
    runs: dict[str, FitResult] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget.unlimited)

    @property
    def cuda(self) -> bool:
        return not self.mode.dry_run

    @property
    def card_cap_bytes(self) -> int:
        """The allocator cap that emulates a `card_gib` card: its size minus the CUDA context already held."""
        return int(self.mode.card_gib * GiB) - self.context_bytes


# -- the recorder --------------------------------------------------------------------------------------


class StepRecorder(Callback):
    """Records every optimizer step (loss, wall time, tokens, micro-batch) and the trainable weights' update.

    Args:
        keep_update: Keep the update itself (final - initial trainable weights, flattened, fp32 on the CPU)
            for a comparison between runs; the norm is always kept.
    """

    def __init__(self, keep_update: bool = False) -> None:
        self.keep_update = keep_update
        self.steps: list[dict[str, Any]] = []
        self.update: torch.Tensor | None = None
        self.update_norm: float | None = None
        self.scaler_scale: float | None = None
        self.precision: str | None = None
        self.max_token_id: int | None = None
        self._initial: dict[str, torch.Tensor] = {}
        self._last = 0.0

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            # The peaks then describe training steps, not the loading of the base before them.
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._initial = {n: p.detach().float().cpu().clone() for n, p in pl_module.named_parameters()
                         if p.requires_grad}
        windows = trainer.datamodule.train_windows
        self.max_token_id = int(windows.input_ids.max()) if len(windows) else None
        self._last = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()  # the step read its loss back already: the device's work is done
        loss = trainer.callback_metrics.get("train/loss")
        self.steps.append({"step": trainer.global_step, "loss": None if loss is None else float(loss),
                           "seconds": now - self._last, "tokens": int(batch["input_ids"].numel()),
                           "micro_batch_size": int(pl_module.micro_batch_size)})
        self._last = now

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        final = {n: p.detach().float().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
        update = torch.cat([(final[n] - self._initial[n]).reshape(-1) for n in sorted(final)])
        self.update_norm = float(update.norm())
        self.update = update if self.keep_update else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        self.precision = str(trainer.precision)


@dataclass
class FitResult:
    """What a run left: its directory, manifest, recorded steps and update."""

    spec: FitSpec
    run_dir: Path
    manifest: dict[str, Any]
    steps: list[dict[str, Any]]
    update: torch.Tensor | None
    update_norm: float | None
    scaler_scale: float | None
    precision: str | None
    max_token_id: int | None
    hparams: dict[str, Any]
    leftover_bytes: int = 0
    """Device memory still allocated by earlier runs when this one started (0 when every run released all)."""

    @property
    def losses(self) -> list[float | None]:
        return [s["loss"] for s in self.steps]

    @property
    def training(self) -> dict[str, Any]:
        return self.manifest.get("phase_results", {}).get("phase_4_training", {})

    @property
    def checkpointing(self) -> bool:
        """Whether the model ran with gradient checkpointing (the manifest's, whatever the flag said)."""
        return bool(self.manifest.get("phase_results", {}).get("phase_3_model", {}).get("gradient_checkpointing"))

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.manifest.get("phase_results", {}).get("phase_3_model", {}).get("vram_plan")

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the steps after the first (which pays for kernel choice and allocator growth)."""
        timed = self.steps[1:]
        if not timed:
            return None
        return sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)


# -- running fits --------------------------------------------------------------------------------------


def fit_args(ctx: Context, spec: FitSpec) -> list[str]:
    recorder = {"class_path": f"{__name__}.{StepRecorder.__name__}", "init_args": {"keep_update": spec.keep_update}}
    flags = {**COMMON_FIT_FLAGS, "model.name_or_path": str(ctx.model_dir), "data.repo": str(ctx.corpus),
             "data.cache_dir": str(ctx.work / "token-cache"), "runs_dir": str(ctx.work / "runs"),
             "run_name": spec.name, "trainer.max_steps": str(spec.steps)}
    if ctx.mode.seq_len is not None:
        flags["data.seq_len"] = str(ctx.mode.seq_len)
    flags.update(spec.overrides)
    args = ["fit", "--config", str(spec.config)]
    for flag, value in flags.items():
        args += [f"--{flag}", value]
    return [*args, f"--trainer.callbacks+={json.dumps(recorder)}"]


def run_fit(ctx: Context, spec: FitSpec) -> FitResult:
    """`codetune fit` in this process under the spec's memory cap and environment; the result is kept in ctx.runs.
    Raises `BudgetSpent`, before anything starts, when the section has no time left."""
    from codetune.cli import build_cli

    ctx.budget.check(f"fit {spec.name}")
    _set_cap(ctx, spec.cap_bytes)
    # What earlier runs left on the card would count in this run's peaks.
    leftover = torch.cuda.memory_allocated(0) if ctx.cuda else 0
    saved = {k: os.environ.get(k) for k in spec.env}
    os.environ.update(spec.env)
    try:
        with _quiet_output():
            cli = build_cli(fit_args(ctx, spec))
        recorder = next(c for c in cli.trainer.callbacks if isinstance(c, StepRecorder))
        run_dir = Path(cli.trainer.default_root_dir)
        result = FitResult(spec=spec, run_dir=run_dir,
                           manifest=json.loads((run_dir / "MANIFEST.json").read_text(encoding="utf-8")),
                           steps=recorder.steps, update=recorder.update, update_norm=recorder.update_norm,
                           scaler_scale=recorder.scaler_scale, precision=recorder.precision,
                           max_token_id=recorder.max_token_id,
                           hparams=dict(cli.model.hparams), leftover_bytes=leftover)
        del cli, recorder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _release(ctx)
    ctx.runs[spec.name] = result
    return result


def _set_cap(ctx: Context, cap_bytes: int | None) -> None:
    if not ctx.cuda:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes or total) / total), 0)


def _release(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet_output():
    """The phase lines and tables a fit prints go to stderr, so stdout holds the check's table alone."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- pure arithmetic ---------------------------------------------------------------------------------


def flops_per_token(model_config: dict[str, Any], seq_len: int, lora_rank: int, lora_targets: Sequence[str],
                    checkpointing: bool, chunked_loss: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token of a frozen-base LoRA step (formula in the module docstring)."""
    from codetune.memory.plan import lora_parameter_count

    shape = model_shape(model_config)
    linear = shape.num_hidden_layers * sum(i * o for i, o, _ in shape.projections().values())
    head = shape.vocab_size * shape.hidden_size
    attention = 2 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_size * seq_len
    lora = lora_parameter_count(shape, lora_rank, tuple(lora_targets))
    model = (2 * linear + 2 * head + attention) + (2 * linear + 2 * head + 2 * attention) + 6 * lora
    recompute = (2 * head if chunked_loss else 0) + ((2 * linear + attention + 2 * lora) if checkpointing else 0)
    return float(model), float(model + recompute)


def peak_tflops(device_name: str | None) -> tuple[float, str] | None:
    """The card's dense 16-bit peak and what it counts, or None for a card not in the table."""
    for fragment, tflops, note in DENSE_16BIT_PEAK_TFLOPS:
        if device_name and fragment in device_name:
            return tflops, note
    return None


def loss_verdict(losses: Sequence[float | None]) -> tuple[bool, bool]:
    """(every loss finite, the last below the first)."""
    finite = bool(losses) and all(x is not None and math.isfinite(x) for x in losses)
    return finite, finite and len(losses) > 1 and losses[-1] < losses[0]


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def plan_cap_between(small_plan_bytes: int, large_plan_bytes: int, measured_over_planned: float = 1.0) -> int:
    """An allocator cap halfway between two plans. Each plan counts the CUDA context, which the allocator's cap
    does not; the rest is scaled by what a measured run held per planned byte (1.0 before any measurement)."""
    from codetune.memory.plan import CUDA_CONTEXT_BYTES

    return int(measured_over_planned * ((small_plan_bytes + large_plan_bytes) / 2 - CUDA_CONTEXT_BYTES))


def file_segments(position_ids: np.ndarray, n_real: int) -> list[tuple[int, int]]:
    """[start, end) of each run of positions 0, 1, 2... in one packed window (a file, or the part of one the
    window holds), padding left out."""
    starts = [i for i in range(n_real) if position_ids[i] == 0] + [n_real]
    return [(a, b) for a, b in zip(starts, starts[1:])]


def model_shape(model_config: dict[str, Any]):
    """The memory plan's `ModelShape` of a Qwen2 config given as a dict (a config.json's contents)."""
    from transformers import Qwen2Config

    from codetune.memory.plan import ModelShape

    return ModelShape.from_config(Qwen2Config.from_dict(model_config))


# -- planning --------------------------------------------------------------------------------------------


def planned_shape(spec: FitSpec, mode: Mode, capability: tuple[int, int] | None):
    """The `TrainingShape` the module would plan for this run (production's resolution of 'auto', and its mapping
    of the module's settings to a plan)."""
    from codetune.memory.plan import training_shape_for
    from codetune.model.loading import resolve_dtype, resolve_quantization
    from codetune.model.optim import resolve_optimizer

    v = spec.settings()
    device = "cpu" if mode.dry_run else "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolve_quantization warns about 'auto' without CUDA
        quantize = resolve_quantization(v["model.quantization"], device == "cuda")
    dtype = resolve_dtype(v["model.dtype"], device, capability)
    return training_shape_for(
        seq_len=int(mode.seq_len or v["data.seq_len"]), micro_batch_size=int(v["data.batch_size"]),
        quantized_4bit=quantize, compute_dtype_bytes=dtype.itemsize, lora_rank=int(v["model.lora_rank"]),
        lora_target_modules=v["model.lora_target_modules"], lora_dropout=float(v["model.lora_dropout"]),
        modules_to_save=v["model.modules_to_save"],
        optimizer=resolve_optimizer(v["model.optimizer"], quantize, device == "cuda"),
        gradient_checkpointing=v["model.gradient_checkpointing"] is True, loss_chunk_size=v["model.loss_chunk_size"],
        attn_implementation=v["model.attn_implementation"], packing=v["data.packing"], device=device)


def fit_on_card(spec: FitSpec, ctx: Context, capability) -> tuple[FitSpec, str]:
    """The spec at the largest micro-batch the plan fits on the emulated card (checkpointing turned on when
    nothing fits without it), and a note of what was chosen."""
    from codetune.memory.plan import largest_micro_batch, largest_micro_batch_with_checkpointing_choice

    shape = model_shape(ctx.mode.model_config)
    # The whole (empty) card: the plan holds the CUDA context itself, which the allocator cap leaves out.
    card = int(ctx.mode.card_gib * GiB)
    shipped = spec.settings()["model.gradient_checkpointing"] is True
    pick = largest_micro_batch if shipped else largest_micro_batch_with_checkpointing_choice
    trial = replace(spec, overrides={**spec.overrides, "model.gradient_checkpointing": "true" if shipped else "false"})
    choice = pick(EFFECTIVE_BATCH, card, shape, planned_shape(trial, ctx.mode, capability))
    if choice is not None:
        checkpointing = "true" if choice.plan.training.gradient_checkpointing else "false"
        overrides = {**spec.overrides, "model.gradient_checkpointing": checkpointing,
                     "data.batch_size": str(choice.micro_batch_size),
                     "data.gradient_accumulation_steps": str(choice.gradient_accumulation_steps)}
        return (replace(spec, overrides=overrides, cap_bytes=ctx.card_cap_bytes),
                f"{choice.micro_batch_size} x {choice.gradient_accumulation_steps}, checkpointing "
                f"{checkpointing}, plan {choice.plan.total / GiB:.2f} GiB")
    raise RuntimeError(f"no micro-batch of {spec.config.name} fits {ctx.mode.card_gib} GiB by the plan, even "
                       f"with checkpointing")


# -- section t: the Turing path on this card -------------------------------------------------------------


TURING = (7, 5)


def section_turing(ctx: Context) -> list[Row]:
    """The Rust config as an RTX 2060 (compute capability 7.5, 6 GiB) trains it, on whatever card is here."""
    spec = FitSpec("t-turing", RUST_CONFIG, steps=ctx.mode.train_steps, cap_bytes=ctx.card_cap_bytes if ctx.cuda
                   else None, overrides={DTYPE_FLAG: "float16" if ctx.cuda else "float32"})
    check = (f"Turing path: rust config at its own micro-batch, {'float16 + GradScaler, ' if ctx.cuda else ''}"
             f"flash and cuDNN SDPA off, capability 7.5" + (f", {ctx.mode.card_gib:g} GiB cap" if ctx.cuda else ""))
    return [budgeted(ctx, check, partial(_turing_row, ctx, spec, check))]


@contextlib.contextmanager
def emulated_turing(ctx: Context) -> Iterator[list]:
    """Within: codetune sees compute capability 7.5 (its dtype, attention kernels and plan are Turing's), torch's
    flash and cuDNN SDPA kernels are off as a Turing card has none, and every SDPA call is recorded. On the CPU the
    memory-efficient kernel cannot be restricted to, so codetune's request is dropped and its layout kept."""
    import codetune.cli as cli_lib
    import codetune.model.attention as attention_lib
    import codetune.model.module as module_lib

    patched = [(module_lib, "cuda_capability", lambda device=None: TURING),
               (cli_lib, "cuda_capability", lambda device=None: TURING),
               (attention_lib, "device_capability", lambda device: TURING)]
    if not ctx.cuda:
        patched.append((attention_lib, "sdpa_kernel", lambda backends: contextlib.nullcontext()))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    flags = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()
    for owner, name, value in patched:
        setattr(owner, name, value)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with attention_lib.record_sdpa_calls() as calls:
            yield calls
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_cudnn_sdp(flags[1])


def attention_kernels_run(calls: Sequence, capability: tuple[int, int]) -> dict[str, int]:
    """How many recorded SDPA calls each kernel ran: torch's own pick on a card, its rules replayed for
    `capability` on the CPU (`codetune.model.kernels.torch_choice`, with the kernels that were enabled)."""
    from codetune.model.kernels import torch_choice

    counts: dict[str, int] = {}
    for call in calls:
        kernel = call.picked if call.picked is not None else torch_choice(capability, call.call, call.enabled)
        counts[str(kernel)] = counts.get(str(kernel), 0) + 1
    return counts


def _turing_row(ctx: Context, spec: FitSpec, check: str) -> Row:
    with emulated_turing(ctx) as calls:
        run = run_fit(ctx, spec)
    kernels = attention_kernels_run(calls, TURING)
    finite, _ = loss_verdict(run.losses)
    model = run.manifest["phase_results"]["phase_3_model"]
    figures: dict[str, Any] = {
        "run_dir": str(run.run_dir), "losses": run.losses, "loss_finite": finite, "sdpa_calls": len(calls),
        "kernels": kernels, "math_calls": kernels.get("math", 0), "precision": run.precision,
        "grad_scaler_scale": run.scaler_scale, "attention": model.get("attention"),
        "float16_residual_scaling": model.get("float16_residual_scaling"), "tokens_per_s": run.tokens_per_s(),
        "micro_batch_size": run.hparams["micro_batch_size"], "seq_len": run.hparams["seq_len"],
        "gradient_checkpointing": run.checkpointing, "oom_backoffs": run.training.get("oom_backoffs", []),
        "cap_gib": None if spec.cap_bytes is None else spec.cap_bytes / GiB,
    }
    ok = finite and figures["sdpa_calls"] > 0 and figures["math_calls"] == 0
    measured = [f"{figures['micro_batch_size']} x {figures['seq_len']}", f"train loss {_fmt(run.losses[0])} -> "
                f"{_fmt(run.losses[-1])}", f"{figures['sdpa_calls']} SDPA calls: {kernels}"]
    criterion = ["losses finite; 0 math-kernel attention calls"]
    if figures["tokens_per_s"] is not None:
        measured.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    if ctx.cuda:
        memory = _memory_figures(run)
        figures.update(memory)
        ok = ok and bool(memory.get("plan_within_10pct")) and run.precision == "16-mixed" and not figures[
            "oom_backoffs"]
        scale = "none" if run.scaler_scale is None else f"{run.scaler_scale:g}"
        measured += [_memory_text(memory), f"{run.precision}, GradScaler scale {scale}"]
        criterion += ["16-mixed", "no OOM back-off", "allocated / (plan - context) within 10%"]
    else:
        measured.append("float32 on the CPU (float16 and memory need CUDA)")
    return Row("t", check, PASS if ok else FAIL, "; ".join(measured), "; ".join(criterion), figures)



# -- section a: training -------------------------------------------------------------------------------


def section_training(ctx: Context) -> list[Row]:
    capability = torch.cuda.get_device_capability(0) if ctx.cuda else None
    rows = []
    for label, config in (("rust", RUST_CONFIG), ("default", DEFAULT_CONFIG)):
        shipped = FitSpec(f"a-{label}-shipped", config, steps=ctx.mode.train_steps)
        check = f"{label} config as shipped, whole card"
        rows.append(budgeted(ctx, check, partial(_training_row, ctx, shipped, check)))
        rows.append(_card_row(ctx, shipped, label, capability))
    return rows


def _card_row(ctx: Context, shipped: FitSpec, label: str, capability: tuple[int, int] | None) -> Row:
    """The shipped config at the largest micro-batch the plan fits on the emulated card, under its cap."""
    capped, note = fit_on_card(shipped, ctx, capability)
    check = f"{label} config on a {ctx.mode.card_gib:g} GiB card"
    if not ctx.cuda:
        return Row("a", check, NEEDS_CUDA, f"the plan would run {note}")
    check += f" ({note})"
    return budgeted(ctx, check, partial(_training_row, ctx, replace(capped, name=f"a-{label}-card"), check))


def _training_row(ctx: Context, spec: FitSpec, check: str) -> Row:
    run = run_fit(ctx, spec)
    finite, _ = loss_verdict(run.losses)
    base, tuned = held_out_losses(run.manifest)
    falling = base is not None and tuned is not None and math.isfinite(tuned) and tuned < base
    hp = run.hparams
    figures: dict[str, Any] = {
        "run_dir": str(run.run_dir), "losses": run.losses, "loss_finite": finite, "held_out_loss_base": base,
        "held_out_loss_tuned": tuned, "held_out_falling": falling,
        "micro_batch_size": hp["micro_batch_size"], "final_micro_batch_size": run.steps[-1]["micro_batch_size"],
        "gradient_accumulation_steps": spec.settings()["data.gradient_accumulation_steps"],
        "seq_len": hp["seq_len"], "gradient_checkpointing": run.checkpointing,
        "optimizer": run.manifest["phase_results"]["phase_3_model"].get("optimizer"),
        "quantized_4bit": run.manifest["phase_results"]["phase_3_model"].get("quantized_4bit"),
        "oom_backoffs": run.training.get("oom_backoffs", []), "tokens_per_s": run.tokens_per_s(),
        "cap_gib": None if spec.cap_bytes is None else spec.cap_bytes / GiB,
        "leftover_gib": run.leftover_bytes / GiB,
    }
    figures.update(_mfu_figures(ctx, run))
    ok = finite and falling
    measured = [f"{figures['micro_batch_size']} x {figures['gradient_accumulation_steps']} x {figures['seq_len']}",
                f"train loss {_fmt(run.losses[0])} -> {_fmt(run.losses[-1])}",
                f"held-out {_fmt(base)} -> {_fmt(tuned)}"]
    if figures["tokens_per_s"] is not None:
        measured.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    criterion = ["train loss finite; held-out loss falling"]
    if ctx.cuda:
        memory = _memory_figures(run)
        figures.update(memory)
        ok = ok and bool(memory.get("plan_within_10pct"))
        measured.append(_memory_text(memory))
        measured.append(f"MFU {_pct(figures['mfu'])}, HFU {_pct(figures['hfu'])}")
        criterion.append("allocated / (plan - context) within 10%")
        if figures["oom_backoffs"]:
            measured.append(f"backed off to {figures['final_micro_batch_size']} (the plan was for "
                            f"{figures['micro_batch_size']})")
    else:
        measured.append("memory, MFU: need CUDA")
    return Row("a", check, PASS if ok else FAIL, "; ".join(measured), "; ".join(criterion), figures)


def held_out_losses(manifest: dict[str, Any]) -> tuple[float | None, float | None]:
    """(the base's held-out loss, the tuned model's) from a run's manifest: the base eval's perplexity, and the
    validation loss after the last step."""
    phases = manifest.get("phase_results", {})
    perplexity = ((phases.get("phase_5_evaluation") or {}).get("base") or {}).get("perplexity")
    stats = (phases.get("phase_4_training") or {}).get("training_stats") or {}
    base = math.log(perplexity) if perplexity else None
    return base, stats.get("final_val_loss")


def _memory_figures(run: FitResult) -> dict[str, Any]:
    return memory_figures(run.training.get("vram") or {}, run.plan or {})


def memory_figures(vram: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Measured peaks (the manifest's `phase_4_training.vram`, GB) against the plan (`phase_3_model.vram_plan`,
    GiB), in GiB; the ratio is allocated / (plan - its CUDA context term)."""
    figures = {"peak_allocated_gib": _gb_to_gib(vram.get("peak_torch_allocated_gb")),
               "peak_reserved_gib": _gb_to_gib(vram.get("peak_torch_reserved_gb")),
               "peak_nvml_gib": _gb_to_gib(vram.get("peak_vram_gb")), "device_name": vram.get("device_name"),
               "plan_gib": plan.get("predicted_peak_gib"),
               "plan_context_gib": (plan.get("terms_gib") or {}).get("cuda_context")}
    if figures["plan_gib"] and figures["peak_allocated_gib"]:
        expected = figures["plan_gib"] - (figures["plan_context_gib"] or 0.0)
        figures["plan_ratio"] = figures["peak_allocated_gib"] / expected
        figures["plan_within_10pct"] = abs(figures["plan_ratio"] - 1) <= PLAN_TOLERANCE
    return figures


def _gb_to_gib(gb: float | None) -> float | None:
    return None if gb is None else gb * GB / GiB


def _memory_text(m: dict[str, Any]) -> str:
    if m.get("plan_ratio") is None:
        return "no VRAM figures (monitor off?)"
    return (f"alloc {m['peak_allocated_gib']:.2f} / reserved {m['peak_reserved_gib']:.2f} / NVML "
            f"{m['peak_nvml_gib']:.2f} GiB vs plan {m['plan_gib']:.2f} (ratio {m['plan_ratio']:.3f})")


def _mfu_figures(ctx: Context, run: FitResult) -> dict[str, Any]:
    hp = run.hparams
    model, hardware = flops_per_token(ctx.mode.model_config, hp["seq_len"], hp["lora_rank"],
                                      hp["lora_target_modules"], run.checkpointing, hp["loss_chunk_size"] is not None)
    name = torch.cuda.get_device_name(0) if ctx.cuda else None
    peak = peak_tflops(name)
    tps = run.tokens_per_s()
    figures = {"flops_per_token_model": model, "flops_per_token_hardware": hardware,
               "peak_tflops": peak[0] if peak else None, "peak_note": peak[1] if peak else "unknown card",
               "mfu": None, "hfu": None}
    if peak and tps:
        figures["mfu"] = model * tps / (peak[0] * 1e12)
        figures["hfu"] = hardware * tps / (peak[0] * 1e12)
    return figures


# -- section b: a real OOM ---------------------------------------------------------------------------------


def section_oom(ctx: Context) -> list[Row]:
    micro = int(FitSpec("b-oom", RUST_CONFIG).settings()["data.batch_size"])
    check = f"OOM at micro-batch {micro} recovered"
    return [budgeted(ctx, check, partial(_oom_row, ctx, check))]


def _oom_row(ctx: Context, check: str) -> Row:
    from codetune.memory.backoff import INJECT_OOM_ENV

    no_dropout = {DROPOUT_FLAG: "0.0"}
    full = FitSpec("b-oom", RUST_CONFIG, overrides=no_dropout, steps=ctx.mode.oom_steps)
    micro = int(full.settings()["data.batch_size"])
    half = micro // 2
    accumulation = EFFECTIVE_BATCH // half
    reference = FitSpec("b-reference", RUST_CONFIG, steps=ctx.mode.oom_steps,
                        overrides={**no_dropout, "data.batch_size": str(half),
                                   "data.gradient_accumulation_steps": str(accumulation)})
    if ctx.cuda:
        from codetune.memory.plan import plan_memory

        shape = model_shape(ctx.mode.model_config)
        capability = torch.cuda.get_device_capability(0)
        large = plan_memory(shape, planned_shape(full, ctx.mode, capability)).total
        small = plan_memory(shape, planned_shape(reference, ctx.mode, capability)).total
        # Section a's measurement of the same config on the card, when there is one, corrects the plan.
        measured = ctx.runs.get("a-rust-card")
        ratio = (_memory_figures(measured).get("plan_ratio") if measured else None) or 1.0
        cap = plan_cap_between(small, large, ratio)
        how = (f"cap {cap / GiB:.2f} GiB (plans: {half} windows {small / GiB:.2f}, {micro} windows "
               f"{large / GiB:.2f} GiB; x {ratio:.3f} measured/planned)")
        full, reference = replace(full, cap_bytes=cap), replace(reference, cap_bytes=cap)
    else:
        full = replace(full, env={INJECT_OOM_ENV: "0"})  # the first step, as under the cap
        how = f"{INJECT_OOM_ENV}=0 (CPU)"
    oom = run_fit(ctx, full)
    ref = run_fit(ctx, reference)
    bits = 32 if oom.hparams["dtype"] == "float32" or (not ctx.cuda and oom.hparams["dtype"] == "auto") else 16
    rtol = OOM_LOSS_RTOL[bits]
    events = oom.training.get("oom_backoffs", [])
    backed_off = any(e.get("micro_batch_size") == half and e.get("reason") == "oom" for e in events)
    diff = relative_difference(oom.losses[-1], ref.losses[-1])
    figures = {"how": how, "oom_backoffs": events, "losses": oom.losses, "reference_losses": ref.losses,
               "final_loss_rel_diff": diff, "rtol": rtol, "micro_batch_sizes": [s["micro_batch_size"]
                                                                               for s in oom.steps]}
    ok = backed_off and diff <= rtol and all(s["micro_batch_size"] == half for s in oom.steps
                                             if s["step"] > events[0]["step"])
    if bits == 32:
        figures["adapter_max_abs_diff"] = _adapter_difference(oom.run_dir, ref.run_dir)
        ok = ok and figures["adapter_max_abs_diff"] <= 1e-5
    measured = (f"{how}: {'backed off ' + str(micro) + ' -> ' + str(half) if backed_off else 'NO back-off'}; "
                f"final loss {_fmt(oom.losses[-1])} vs {_fmt(ref.losses[-1])} started at {half} (rel {diff:.1e})")
    if "adapter_max_abs_diff" in figures:
        measured += f"; adapters within {figures['adapter_max_abs_diff']:.1e}"
    return Row("b", check, PASS if ok else FAIL, measured,
               f"one back-off to {half}; final loss rel diff <= {rtol:g}" + ("; adapters <= 1e-5" if bits == 32
                                                                              else ""), figures)


def _adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


# -- section c: the Turing path -----------------------------------------------------------------------------


def section_precision(ctx: Context) -> list[Row]:
    from codetune.model.loading import precision_for, resolve_dtype

    rows = []
    turing = resolve_dtype("auto", "cuda", (7, 5))
    chosen = precision_for(turing)
    rows.append(Row("c", "Turing (7.5): auto dtype and precision", PASS if (turing, chosen) ==
                    (torch.float16, "16-mixed") else FAIL, f"{str(turing).replace('torch.', '')}, {chosen}",
                    "float16, 16-mixed"))
    tested, reference = ("float16", "bfloat16") if ctx.cuda else ("bfloat16", "float32")
    if not ctx.cuda:
        rows.append(Row("c", "float16 training (16-mixed, GradScaler)", NEEDS_CUDA,
                        "Lightning trains 16-mixed as bf16-mixed on CPU; bf16 vs fp32 below instead"))
    check = f"{tested} vs {reference}: adapter updates"
    rows.append(budgeted(ctx, check, partial(_precision_row, ctx, tested, reference, check)))
    return rows


def _precision_row(ctx: Context, tested: str, reference: str, check: str) -> Row:
    from codetune.model.loading import precision_for

    overrides = {**ctx.mode.precision_window, DROPOUT_FLAG: "0.0"}
    runs = {dtype: run_fit(ctx, FitSpec(f"c-{dtype}", DEFAULT_CONFIG, steps=ctx.mode.precision_steps,
                                        overrides={**overrides, DTYPE_FLAG: dtype}, keep_update=True))
            for dtype in (tested, reference)}
    a, b = runs[tested], runs[reference]
    finite = all(loss_verdict(r.losses)[0] for r in runs.values())
    ratio = a.update_norm / b.update_norm if b.update_norm else float("nan")
    cosine = float(torch.nn.functional.cosine_similarity(a.update, b.update, dim=0))
    scaler_ok = a.scaler_scale is not None if tested == "float16" else a.scaler_scale is None
    precision_ok = a.precision == precision_for(getattr(torch, tested))
    ok = (finite and scaler_ok and precision_ok and abs(ratio - 1) <= UPDATE_RATIO_TOLERANCE
          and cosine >= UPDATE_MIN_COSINE)
    figures = {"tested": tested, "reference": reference, "losses": a.losses, "reference_losses": b.losses,
               "update_norm": a.update_norm, "reference_update_norm": b.update_norm, "update_ratio": ratio,
               "update_cosine": cosine, "grad_scaler_scale": a.scaler_scale,
               "precision": a.precision, "reference_precision": b.precision}
    scaler = f"GradScaler scale {a.scaler_scale:g}" if a.scaler_scale is not None else "no GradScaler"
    return Row("c", check, PASS if ok else FAIL,
               f"{a.precision} vs {b.precision}; loss {_fmt(a.losses[-1])} vs {_fmt(b.losses[-1])}; update "
               f"norm ratio {ratio:.3f}, cosine {cosine:.3f}; {scaler}",
               f"{precision_for(getattr(torch, tested))}; losses finite; ratio 1 +- {UPDATE_RATIO_TOLERANCE:g}; "
               f"cosine >= {UPDATE_MIN_COSINE:g}" + ("; a GradScaler" if tested == "float16" else ""), figures)


# -- section d: packed-window isolation ---------------------------------------------------------------------


def section_isolation(ctx: Context) -> list[Row]:
    windows = _isolation_windows(ctx)
    rows = []
    for attn in ("sdpa", "eager", "flash_attention_2"):
        check = f"isolation, {ctx.mode.isolation_rows} windows of {windows.seq_len}, {attn}"
        if attn == "flash_attention_2" and not ctx.cuda:
            rows.append(Row("d", check, NEEDS_CUDA))
            continue
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            rows.append(Row("d", check, "skipped: flash_attn not importable"))
            continue
        rows.append(budgeted(ctx, check, partial(_isolation_row, ctx, windows, attn, check)))
    return rows


def _isolation_windows(ctx: Context):
    """A few packed windows of corpus text, cut so each window holds several files (and continued ones)."""
    from transformers import AutoTokenizer

    from codetune.data.files import DEFAULT_EXTENSIONS, scan_repository
    from codetune.data.packing import pack_windows
    from codetune.data.tokens import pad_token_id, tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    texts = [f.text for f in scan_repository(ctx.corpus, DEFAULT_EXTENSIONS).files][:64]
    seq = ctx.mode.isolation_seq_len
    rng = np.random.default_rng(0)
    # Pieces of a sixth to a half of a window: three or four files a window, some continued from the last.
    pieces = [ids[: int(rng.integers(seq // 6, seq // 2))] for ids in tokenize_texts(tokenizer, texts)
              if len(ids) >= seq // 2]
    windows = pack_windows(pieces, seq, tokenizer.eos_token_id, pad_token_id(tokenizer), "isolated")
    if len(windows) < ctx.mode.isolation_rows:
        raise RuntimeError(f"the corpus packs into {len(windows)} windows of {seq}; isolation needs "
                           f"{ctx.mode.isolation_rows}")
    n = ctx.mode.isolation_rows
    return type(windows)(windows.input_ids[:n], windows.position_ids[:n], windows.n_real[:n])


def isolation_errors(module, windows, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Max |logits of each segment inside the packed batch - logits of the segment alone|, relative to the
    largest reference logit; and the same for a control whose positions run across files (concat)."""
    input_ids = torch.from_numpy(windows.input_ids.astype(np.int64)).to(device)
    positions = torch.from_numpy(windows.position_ids.astype(np.int64)).to(device)
    batch, seq = input_ids.shape
    concat_positions = torch.arange(seq, device=device).expand(batch, seq)
    head = module.causal_lm.get_output_embeddings()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def logits(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden, _ = module.hidden_states({"input_ids": ids, "position_ids": pos, "labels": ids.clone()})
        return head(hidden.reshape(ids.shape[0], ids.shape[1], -1)).float()

    worst, control, scale, segments = 0.0, 0.0, 0.0, 0
    with torch.no_grad(), autocast:
        packed, concat = logits(input_ids, positions), logits(input_ids, concat_positions)
        for row in range(batch):
            for start, end in file_segments(windows.position_ids[row], int(windows.n_real[row])):
                if end - start < 2:
                    continue
                alone = logits(input_ids[row:row + 1, start:end], positions[row:row + 1, start:end])[0]
                scale = max(scale, float(alone.abs().max()))
                worst = max(worst, float((packed[row, start:end] - alone).abs().max()))
                if start > 0:  # a segment after others: in concat it sees them
                    control = max(control, float((concat[row, start:end] - alone).abs().max()))
                segments += 1
    return {"segments": segments, "max_abs_diff": worst, "control_max_abs_diff": control, "logit_scale": scale,
            "rel_diff": worst / scale, "control_rel_diff": control / scale}


def _isolation_row(ctx: Context, windows, attn: str, check: str) -> Row:
    from codetune.memory.plan import DEFAULT_LORA_TARGETS
    from codetune.model.loading import apply_lora, keep_adapter_input_dtype, load_causal_lm
    from codetune.model.module import CodeLoRAModule

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    _set_cap(ctx, None)
    module = CodeLoRAModule(name_or_path=str(ctx.model_dir), attn_implementation=attn, lora_dropout=0.0)
    base = load_causal_lm(ctx.model_dir, ctx.cuda, dtype, False, attn, ctx.mode.device)
    module.model = apply_lora(base if ctx.cuda else base.to(ctx.mode.device), 8, 16, 0.0, list(DEFAULT_LORA_TARGETS))
    keep_adapter_input_dtype(module.model)
    module.model.eval()
    try:
        figures = isolation_errors(module, windows, ctx.mode.device, dtype)
    finally:
        del module, base
        _release(ctx)
    tol = ISOLATION_RTOL[16 if ctx.cuda else 32]
    figures["rtol"] = tol
    if figures["rel_diff"] > tol:
        status = FAIL
    elif figures["control_rel_diff"] < CONTROL_FACTOR * tol:
        status = INCONCLUSIVE
    else:
        status = PASS
    return Row("d", check, status,
               f"{figures['segments']} segments: rel diff {figures['rel_diff']:.1e}; control (concat) "
               f"{figures['control_rel_diff']:.1e}",
               f"<= {tol:g} of the logits' scale; control >= {CONTROL_FACTOR * tol:g}", figures)


# -- section e: generate and merge ----------------------------------------------------------------------------


def section_use(ctx: Context) -> list[Row]:
    # A run of section a (the Rust config, NF4 on CUDA), else any earlier one, else a short one of its own (a
    # budget spent before it skips the whole section).
    run = next((r for name, r in ctx.runs.items() if name.startswith("a-rust")), None)
    run = run or next(iter(ctx.runs.values()), None)
    if run is None:
        run = run_fit(ctx, FitSpec("e-run", RUST_CONFIG, steps=2))
    rows = [budgeted(ctx, "codetune generate", partial(_generate_row, ctx, run)),
            budgeted(ctx, "codetune merge", partial(_merge_row, ctx, run))]
    _release(ctx)
    return rows


def _generate_row(ctx: Context, run: FitResult) -> Row:
    from codetune.__main__ import main

    _set_cap(ctx, None)
    prompt = "def analyze_"
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = main(["generate", str(run.run_dir), "--prompt", prompt, "--max_new_tokens", "16"])
    text = out.getvalue().strip()
    quantized = bool(run.manifest["phase_results"]["phase_3_model"].get("quantized_4bit"))
    ok = status == 0 and text.startswith(prompt) and (quantized or not ctx.cuda)
    return Row("e", f"codetune generate ({'NF4' if quantized else 'unquantized'}, {ctx.mode.device.type})",
               PASS if ok else FAIL, f"exit {status}, {time.perf_counter() - started:.1f} s: {text[:60]!r}",
               "exit 0, prints prompt + completion" + ("; the run's base in NF4" if ctx.cuda else ""),
               {"exit_status": status, "output": text, "run_dir": str(run.run_dir)})


def _merge_row(ctx: Context, run: FitResult) -> Row:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codetune.__main__ import main

    dtype_name = "bfloat16" if ctx.cuda else "float32"
    dtype = getattr(torch, dtype_name)
    out_dir = ctx.work / "merged"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["merge", str(run.run_dir), "--out", str(out_dir), "--dtype", dtype_name])
    merge_s = time.perf_counter() - started
    if status != 0:
        return Row("e", "codetune merge", FAIL, f"exit {status}", "exit 0", {"exit_status": status})
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = torch.tensor([tokenizer("def analyze_energy(values):\n    total =", add_special_tokens=False)["input_ids"]],
                       device=ctx.mode.device)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(ctx.mode.device).eval()
        merged_logits = merged(input_ids=ids).logits.float()
        del merged
        _release(ctx)
        base = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype).to(ctx.mode.device)
        tuned = PeftModel.from_pretrained(base, str(run.run_dir / "adapter")).eval()
        tuned_logits = tuned(input_ids=ids).logits.float()
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=ids).logits.float()
        del tuned, base
    scale = float(tuned_logits.abs().max())
    rel = float((merged_logits - tuned_logits).abs().max()) / scale
    # What the adapter changes: a merge that dropped it would be off by this much.
    effect = float((base_logits - tuned_logits).abs().max()) / scale
    tol = MERGE_RTOL[16 if ctx.cuda else 32]
    verdict = FAIL if rel > tol else (INCONCLUSIVE if effect < CONTROL_FACTOR * rel else PASS)
    return Row("e", f"codetune merge ({dtype_name}) = base + adapter", verdict,
               f"exit 0, {merge_s:.1f} s; logits rel diff {rel:.1e} on {ids.shape[1]} tokens; the adapter "
               f"moves them by {effect:.1e}",
               f"<= {tol:g} of the logits' scale; adapter effect >= {CONTROL_FACTOR:g} x that",
               {"exit_status": status, "rel_diff": rel, "adapter_effect_rel": effect, "merge_s": merge_s})


# -- section f: GPU tests -----------------------------------------------------------------------------------


def section_gpu_tests(ctx: Context) -> list[Row]:
    check = "pytest -m gpu tests/gpu"
    if not ctx.cuda:
        return [Row("f", check, NEEDS_CUDA)]
    return [budgeted(ctx, check, partial(_gpu_tests_row, ctx))]


def _gpu_tests_row(ctx: Context) -> Row:
    """The GPU tests in a subprocess, which, unlike a fit, the budget can stop: at the section's time left."""
    started = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    left = ctx.budget.left_s()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO_ROOT / "tests" / "gpu")],
                              cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path},
                              timeout=None if math.isinf(left) else left)
    except subprocess.TimeoutExpired as expired:
        print(_text(expired.stdout)[-4000:], _text(expired.stderr)[-2000:], sep="\n", file=sys.stderr)
        raise ctx.budget.spent(f"the rest of pytest -m gpu tests/gpu (stopped after {left:.0f} s)") from None
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return Row("f", "pytest -m gpu tests/gpu", PASS if proc.returncode == 0 else FAIL,
               f"{summary} ({time.perf_counter() - started:.0f} s)", "exit 0",
               {"returncode": proc.returncode, "summary": summary})


def _text(output: bytes | str | None) -> str:
    # TimeoutExpired holds what was captured as bytes, even with text=True.
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "t": section_turing, "a": section_training, "b": section_oom, "c": section_precision, "d": section_isolation, "e": section_use,
    "f": section_gpu_tests,
}
SECTION_TITLES = {"t": "Turing path", "a": "training", "b": "OOM back-off", "c": "fp16 (Turing)", "d": "packed isolation",
                  "e": "generate / merge", "f": "GPU tests"}


# -- setup: model and corpus ----------------------------------------------------------------------------------


def corpus_texts(roots: Sequence[Path]) -> dict[str, str]:
    from codetune.data.files import source_texts

    texts = source_texts(roots)
    if not texts:
        raise SystemExit(f"no source files under {[str(r) for r in roots]}; pass --corpus DIR")
    return texts


def tokens_needed(mode: Mode) -> int:
    """Tokens the longest run trains (with CORPUS_MARGIN): one epoch must hold all its steps."""
    windows = EFFECTIVE_BATCH * max(mode.train_steps, mode.oom_steps, mode.precision_steps)
    return int(CORPUS_MARGIN * windows * (mode.seq_len or 4096))


def build_model_dir(mode: Mode, texts: Sequence[str], directory: Path) -> dict[str, Any]:
    """The randomly initialised Qwen2 of `mode` and a tokenizer trained on `texts`, saved for `from_pretrained`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from codetune.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=mode.tokenizer_vocab)
    # The tokenizer's special ids (a hub config names Qwen's own, which this tokenizer does not have).
    config = Qwen2Config.from_dict({**mode.model_config, "bos_token_id": tokenizer.bos_token_id,
                                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"tokenizer of {len(tokenizer)} tokens does not fit the model's vocabulary "
                         f"({config.vocab_size})")
    with torch.device(mode.device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32 if mode.dry_run else torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if not mode.dry_run:
        torch.cuda.empty_cache()  # the fp32 init's blocks: the caps below count reserved memory
    return {"parameters": parameters, "tokenizer_tokens": len(tokenizer), "vocab_size": config.vocab_size,
            "config_source": str(MODEL_CONFIG_FILE) if MODEL_CONFIG_FILE.is_file() and not mode.dry_run else "code"}


def cuda_context_bytes() -> int:
    """Device memory in use before torch allocates anything: this process's CUDA context (and other processes)."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # creates the context and loads the first kernels
    free, total = torch.cuda.mem_get_info(0)
    return total - free - torch.cuda.memory_reserved(0)


def setup(mode: Mode, work: Path, corpus_roots: Sequence[Path]) -> tuple[Context, Row]:
    from codetune.memory.allocator import allocator_record

    started = time.perf_counter()
    context = cuda_context_bytes() if not mode.dry_run else 0
    texts = corpus_texts(corpus_roots)
    model_dir = work / "model"
    model = build_model_dir(mode, list(texts.values()), model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus_tokens = sum(len(ids) + 1 for ids in tokenizer(list(texts.values()))["input_ids"])
    copies = max(1, -(-tokens_needed(mode) // corpus_tokens))
    write_corpus(texts, copies, work / "corpus")
    ctx = Context(mode=mode, work=work, model_dir=model_dir, corpus=work / "corpus", context_bytes=context)
    device = torch.cuda.get_device_name(0) if not mode.dry_run else "cpu"
    figures = {**model, "corpus_files": len(texts), "corpus_tokens": corpus_tokens, "corpus_copies": copies,
               "device": device, "cuda_context_gib": context / GiB, "card_gib": mode.card_gib,
               "allocator_cap_gib": ctx.card_cap_bytes / GiB if not mode.dry_run else None,
               "torch": torch.__version__, "cuda_allocator": allocator_record(),
               "setup_s": time.perf_counter() - started}
    shape = mode.model_config
    measured = (f"Qwen2 {shape['num_hidden_layers']} x {shape['hidden_size']} ({model['parameters'] / 1e6:,.1f}M, "
                f"vocab {model['vocab_size']:,}, tokenizer {model['tokenizer_tokens']:,}); corpus {len(texts)} files "
                f"x {copies}, {corpus_tokens:,} tokens; {device}")
    if not mode.dry_run:
        measured += (f"; card {mode.card_gib:g} GiB = context {context / GiB:.2f} + allocator cap "
                     f"{ctx.card_cap_bytes / GiB:.2f}")
    return ctx, Row("setup", "random model, tokenizer, corpus", PASS, measured,
                    "tokenizer fits the vocabulary", figures)


def vocabulary_row(ctx: Context) -> Row | None:
    """Whether every token id the runs trained on is below the model's vocabulary (none is cut or remapped)."""
    ids = [r.max_token_id for r in ctx.runs.values() if r.max_token_id is not None]
    if not ids:
        return None
    vocab = ctx.mode.model_config["vocab_size"]
    return Row("setup", "token ids < model vocabulary", PASS if max(ids) < vocab else FAIL,
               f"max id in the packed windows {max(ids):,} < {vocab:,}", "every id < vocab_size",
               {"max_token_id": max(ids), "vocab_size": vocab})


# -- the table ------------------------------------------------------------------------------------------------


def render(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name in ("section", "check", "status", "measured", "criterion"):
        table.add_column(name, overflow="fold")
    colours = {PASS: "green", FAIL: "red", INCONCLUSIVE: "yellow"}
    for row in rows:
        colour = colours.get(row.status, "dim")
        section = f"{row.section} {SECTION_TITLES.get(row.section, '')}".strip()
        table.add_row(section, row.check, f"[{colour}]{row.status}[/]", row.measured, row.criterion)
    Console(width=int(os.environ.get("COLUMNS", "200"))).print(table)
    sys.stdout.flush()  # a pipe buffers: what a time limit would kill must already be out


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    """The rows and `meta` as JSON, replacing `path` whole (a temporary sibling, then a rename)."""
    from codetune.storage import atomic_write_text

    document = {**meta, "rows": [row.__dict__ for row in rows]}
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


@dataclass
class Report:
    """The rows so far, printed and written (`--out`) as setup and each section end, so a command stopped by its
    time limit still returns the sections it finished; `complete` is true only in the last write."""

    out: Path | None
    meta: dict[str, Any]
    """What the JSON holds besides the rows, the timings and the budget (mode, sections, device)."""
    budget: Budget
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, part: str, rows: Sequence[Row], seconds: float) -> None:
        """Setup's or a section's rows: printed as a small table, and written with every row so far."""
        self.rows += rows
        label = f"section {part}, {SECTION_TITLES[part]}" if part in SECTION_TITLES else part
        render(rows, f"gpu_check {label}: {seconds:.0f} s")
        self.write(complete=False)

    def write(self, complete: bool, title: str | None = None) -> None:
        if self.out is None:
            return
        wall = time.perf_counter() - self.started
        write_json(self.out, self.rows, {
            "title": title or f"codetune GPU check ({self.meta['device']}; {wall:.0f} s so far)", **self.meta,
            "complete": complete, "wall_s": wall,
            "section_s": {name: round(seconds, 1) for name, seconds in self.budget.spent_s.items()},
            "budget": self.budget.report()})

    def finish(self) -> None:
        """The full table, and the JSON marked complete."""
        title = f"codetune GPU check ({self.meta['device']}; {time.perf_counter() - self.started:.0f} s)"
        render(self.rows, title)
        self.write(complete=True, title=title)


# -- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same sections on CPU, tiny shapes")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the rows as JSON to this file (rewritten as each section ends)")
    parser.add_argument("--sections", default="tabcdef", help="which sections to run, e.g. 'a,d' (default: all)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all the sections run, shared in the proportions of SECTION_BUDGET_S; a "
                             "unit of work finding its section's share spent is skipped (default: %(default)g)")
    parser.add_argument("--card-gib", type=float, default=6.0, help="the card to emulate (GiB, context included)")
    parser.add_argument("--corpus", type=Path, action="append", default=None,
                        help=f"source directory to train on (repeatable; default: this repository's "
                             f"{', '.join(SOURCE_DIRS)})")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.replace(",", "") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections {unknown}: use letters of {''.join(SECTIONS)}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s:g}: must be a positive number of seconds")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: run on a GPU machine, or use --dry-run")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from codetune.memory.allocator import set_allocator_default

    # The fits run in this process, not through `codetune`'s entry point: the allocator is set here, before CUDA.
    set_allocator_default()
    args = parse_args(argv)
    _quiet_libraries()
    if args.dry_run:
        # The tiny shapes gain nothing from more threads, and on a shared machine OpenMP threads that wait for
        # busy cores made the dry run 8x slower (23 s against 197 s at a load of 5 on 2 cores).
        torch.set_num_threads(1)
    mode = dry_mode(args.card_gib) if args.dry_run else real_mode(args.card_gib)
    roots = args.corpus or [REPO_ROOT / d for d in SOURCE_DIRS]
    device = "dry run, CPU" if mode.dry_run else torch.cuda.get_device_name(0)
    report = Report(args.out, {"dry_run": mode.dry_run, "device": device, "sections": args.sections},
                    Budget.shared(args.budget_s, args.sections))
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codetune-gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx, setup_row = setup(mode, work, roots)
        ctx.budget = report.budget
        report.meta["setup_s"] = setup_row.figures["setup_s"]
        report.add("setup", [setup_row], setup_row.figures["setup_s"])
        for name in args.sections:
            report.add(name, *run_section(name, ctx))
        vocab = vocabulary_row(ctx)
        if vocab is not None:
            report.rows.insert(1, vocab)
    report.finish()
    return 1 if any(r.status == FAIL for r in report.rows) else 0


def run_section(name: str, ctx: Context) -> tuple[list[Row], float]:
    """A section's rows within its budget, and its seconds."""
    ctx.budget.start(name)
    rows = _section_rows(name, ctx)
    seconds = ctx.budget.finish()
    print(f"gpu_check: section {name} ({SECTION_TITLES[name]}) done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, seconds


def _section_rows(name: str, ctx: Context) -> list[Row]:
    """A section's rows; one `skipped: budget` row when it starts after the total budget is spent (or spends it
    outside a row), one FAIL row when it raises (the traceback on stderr: the other sections still run)."""
    try:
        ctx.budget.check(f"section {name} ({SECTION_TITLES[name]})")
        return SECTIONS[name](ctx)
    except BudgetSpent as spent:
        _release(ctx)
        return [ctx.budget.skipped_row(SECTION_TITLES[name], spent)]
    except Exception as err:  # noqa: BLE001  a section's failure is a FAIL row; the other sections still run
        traceback.print_exc(file=sys.stderr)
        _release(ctx)
        return [Row(name, SECTION_TITLES[name], FAIL, f"{type(err).__name__}: {str(err)[:300]}")]


def _quiet_libraries() -> None:
    # The table is the output; the frameworks' info logs and deprecation notes would bury it.
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for module in ("lightning", "transformers", "peft", "bitsandbytes", "torch"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message="codetune: no CUDA device")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _pct(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
