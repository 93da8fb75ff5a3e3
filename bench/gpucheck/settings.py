"""The GPU check's fixed settings: paths, model shapes, the flags every fit gets, card peaks, tolerances, section
titles and budget shares; `Mode` (the sizes of a real or a dry run) and `FitSpec` (one `codetune fit`)."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

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

SECTION_TITLES = {"t": "Turing path", "a": "training", "b": "OOM back-off", "c": "fp16 (Turing)",
                  "d": "packed isolation", "e": "generate / merge", "f": "GPU tests"}
# Each section's share of --budget-s, in seconds at the default total (the shares of the sections run are scaled to
# the total): one 600 s device command then keeps ~2 minutes for the imports, the setup, the one unit of work a
# cap cannot stop, and copying the results back.
DEFAULT_BUDGET_S = 480.0
SECTION_BUDGET_S = {"t": 70.0, "a": 170.0, "b": 60.0, "c": 50.0, "d": 35.0, "e": 50.0, "f": 45.0}


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
