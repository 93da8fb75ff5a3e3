"""Training throughput of the tiny model on CPU: codetune vs TRL's SFTTrainer with packing.

Run from the repository root (it needs `trl`, a benchmark-only dependency: ``pip install trl``)::

    python bench/train_throughput.py                          # this project's own Python source
    python bench/train_throughput.py --repo /usr/share/cargo/registry --ext .rs --steps 20

Both sides train the same model on the same files in the same process, one after the other:

* **Model.** One tiny Llama (`codetune.model.tiny`: 2 layers, hidden 128) and a byte-level BPE
  tokenizer trained on the corpus are saved once into a temporary directory; both sides load it
  from there in fp32 with SDPA attention and wrap it in the same LoRA (rank, alpha, dropout and
  target modules are read back from the codetune run's hyper-parameters).
* **Corpus.** The files of `--repo` (default: this repository's ``codetune/``, ``callbacks/`` and
  ``tests/``) as `codetune.data.files.scan_repository` keeps them. When they hold fewer tokens than
  ``--steps`` optimizer batches need, they are repeated (each copy with extra trailing newlines, so
  codetune's duplicate filter keeps it), so that no epoch ends inside the timed steps on either side.
* **codetune** runs as a user runs it: ``codetune fit --config configs/training_config.yaml
  --config configs/presets/demo.yaml`` plus overrides (no validation, no generation prompts, no
  progress bar, every file in the training split). It packs each optimizer batch of
  ``batch x accum`` windows and cuts it into micro-batches of ``batch`` windows.
* **TRL** runs `SFTTrainer` with ``packing=True`` and the same window (``max_length``), micro-batch,
  accumulation, learning rate, schedule, warm-up, weight decay, clipping, optimizer (torch AdamW),
  seed, fp32 and no gradient checkpointing (TRL's defaults are bf16 and checkpointing on). The
  default strategy ``bfd_split`` keeps every token and isolates files, as codetune's
  ``isolated`` packing does; TRL's default ``bfd`` truncates every file to one window.

Timing. A clock on each side is read at the end of every optimizer step (Lightning's
``on_train_batch_end``, the Trainer's ``on_step_end``). The figure is the tokens of steps
``warmup+1 .. steps`` divided by the wall time from the end of step ``warmup`` to the end of the
last step: it includes data loading, the optimizer and each framework's per-step bookkeeping, and
excludes model loading, tokenization, warm-up, validation, checkpoints and the adapter export.
Tokens are the ``input_ids`` elements each step trained on (``batch x accum x seq_len`` for
codetune; the packed, padding-free rows for TRL). ``--rounds 2`` alternates the two frameworks
to spread the noise of a shared machine over both; the table reports each round and the total.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE_DIRS = ("codetune", "callbacks", "tests")
SEED = 42
# Tokens the corpus holds per token the timed run trains: room for TRL's best-fit bins, which are
# not all full, so that neither side reaches an epoch end.
CORPUS_MARGIN = 1.1


@dataclass
class StepClock:
    """Tokens and wall time of the optimizer steps after `warmup` (read at the end of each step)."""

    warmup: int
    steps_seen: int = 0
    tokens: int = 0
    started: float | None = None
    ended: float | None = None
    threads: set[int] = field(default_factory=set)

    def step_ended(self, tokens: int) -> None:
        self.steps_seen += 1
        now = time.perf_counter()
        self.threads.add(torch.get_num_threads())
        if self.steps_seen == self.warmup:
            self.started = now
        elif self.steps_seen > self.warmup:
            self.tokens += tokens
            self.ended = now

    @property
    def steps_timed(self) -> int:
        return max(0, self.steps_seen - self.warmup)

    @property
    def seconds(self) -> float:
        if self.started is None or self.ended is None:
            raise RuntimeError(f"only {self.steps_seen} optimizer steps ran; need more than --warmup {self.warmup}")
        return self.ended - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# -- corpus and model --------------------------------------------------------------------------


def scan_texts(roots: list[Path], extensions: list[str]) -> dict[str, str]:
    """Relative path -> text of every file codetune would keep under `roots`."""
    from codetune.data.files import source_texts

    texts = source_texts(roots, extensions)
    if not texts:
        raise SystemExit(f"no {extensions} files under {[str(r) for r in roots]}; use --repo and --ext")
    return texts


def copies_needed(corpus_tokens: int, tokens_per_step: int, steps: int) -> int:
    """How many copies of the corpus hold `steps` optimizer batches (with a margin)."""
    return max(1, -(-int(CORPUS_MARGIN * steps * tokens_per_step) // corpus_tokens))


def write_corpus(texts: dict[str, str], copies: int, directory: Path) -> None:
    for copy in range(copies):
        for rel_path, text in texts.items():
            path = directory / f"copy{copy}" / rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            # Extra trailing newlines make every copy's bytes unique, so the duplicate filter keeps it.
            path.write_text(text + "\n" * copy, encoding="utf-8")


def build_model_dir(texts: list[str], seq_len: int, directory: Path) -> tuple[Any, Any]:
    """The tiny Llama and its tokenizer (trained on `texts`), saved where both frameworks load them."""
    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    tokenizer = train_tokenizer(texts)
    model = build_tiny_model(tokenizer, seed=0, max_position_embeddings=max(seq_len, 4096))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer, model.config


# -- codetune --------------------------------------------------------------------------------


class LightningStepClock(Callback):
    """Feeds a `StepClock`: a codetune training batch is one whole optimizer step."""

    def __init__(self, warmup: int) -> None:
        self.clock = StepClock(warmup)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.clock.step_ended(int(batch["input_ids"].numel()))


def run_codetune(args: argparse.Namespace, model_dir: Path, corpus_dir: Path, runs_dir: Path,
                 name: str) -> tuple[StepClock, dict]:
    """`codetune fit` with the demo preset; returns the clock and the module's hyper-parameters."""
    from codetune.cli import build_cli

    clock_callback = {"class_path": f"{__name__}.{LightningStepClock.__name__}",
                      "init_args": {"warmup": args.warmup}}
    cli = build_cli([
        "fit",
        "--config", str(REPO_ROOT / "configs/training_config.yaml"),
        "--config", str(REPO_ROOT / "configs/presets/demo.yaml"),
        "--model.name_or_path", str(model_dir),
        "--data.repo", str(corpus_dir),
        "--data.extensions", json.dumps(args.ext),
        "--data.val_fraction", "0",
        "--data.seq_len", str(args.seq_len),
        "--data.batch_size", str(args.batch),
        "--data.gradient_accumulation_steps", str(args.accum),
        "--trainer.max_steps", str(args.steps),
        "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        f"--trainer.callbacks+={json.dumps(clock_callback)}",
        "--generation.prompts", "[]",
        "--seed_everything", str(SEED),
        "--runs_dir", str(runs_dir),
        "--run_name", name,
    ])
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, LightningStepClock))
    return timer.clock, dict(cli.model.hparams)


# -- TRL -------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, model_dir: Path, texts: list[str], hp: dict, output_dir: Path) -> StepClock:
    """SFTTrainer with packing, configured like the codetune run (`hp`: its module's hyper-parameters)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = StepClock(args.warmup)
    step_tokens = [0]

    class TokenCountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            step_tokens[0] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *rest, **kwargs)

    class TrainerStepClock(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            clock.step_ended(step_tokens[0])
            step_tokens[0] = 0

    config = SFTConfig(
        output_dir=str(output_dir),
        packing=True,
        packing_strategy=args.trl_packing,
        max_length=args.seq_len,
        dataset_text_field="text",
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        max_steps=args.steps,
        learning_rate=hp["learning_rate"],
        lr_scheduler_type="cosine",
        # codetune caps the warm-up at half the run the same way (configure_optimizers).
        warmup_steps=min(hp["warmup_steps"], args.steps // 2),
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"],
        optim="adamw_torch",
        # TRL defaults to bf16 and gradient checkpointing; codetune's demo run uses neither.
        bf16=False,
        fp16=False,
        gradient_checkpointing=hp["gradient_checkpointing"],
        use_cpu=True,
        seed=SEED,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=list(hp["lora_target_modules"]),
                      modules_to_save=list(hp["modules_to_save"]) or None, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=hp["attn_implementation"])
    trainer = TokenCountingSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=lora,
        callbacks=[TrainerStepClock()],
    )
    # With logging off, the Trainer's printer callback would still print the final metrics dict.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock


# -- report ----------------------------------------------------------------------------------


def format_table(rows: list[tuple[str, StepClock, float]]) -> str:
    """One line per run; `load` is the 1-minute load average after it (above the thread count: shared cores)."""
    lines = [f"{'framework':<34} {'threads':>7} {'steps timed':>11} {'tokens':>9} {'seconds':>8} {'tokens/s':>9} "
             f"{'load':>5}"]
    for name, clock, load in rows:
        threads = ",".join(str(t) for t in sorted(clock.threads))
        lines.append(f"{name:<34} {threads:>7} {clock.steps_timed:>11} {clock.tokens:>9,} "
                     f"{clock.seconds:>8.2f} {clock.tokens_per_s:>9,.0f} {load:>5.1f}")
    return "\n".join(lines)


def total(clocks: list[StepClock]) -> tuple[int, float]:
    return sum(c.tokens for c in clocks), sum(c.seconds for c in clocks)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (--data.seq_len, max_length)")
    parser.add_argument("--batch", type=int, default=8, help="windows per micro-batch")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps run before the clock starts")
    parser.add_argument("--rounds", type=int, default=1, help="alternating codetune/TRL runs (noise)")
    parser.add_argument("--repo", type=Path, default=None,
                        help="corpus directory (default: this repository's codetune/, callbacks/, tests/)")
    parser.add_argument("--ext", action="append", default=None, help="file extension to train on (repeatable; .py)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--trl-packing", choices=["bfd_split", "bfd", "wrapped"], default="bfd_split",
                        help="SFTConfig.packing_strategy")
    args = parser.parse_args(argv)
    args.ext = args.ext or [".py"]
    problems = [f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
                for name in ("seq_len", "batch", "accum", "steps", "warmup", "rounds", "threads")
                if getattr(args, name) < 1]
    if args.warmup >= args.steps:
        problems.append(f"--warmup {args.warmup}: must be below --steps {args.steps} (the clock starts after it)")
    if importlib.util.find_spec("trl") is None:
        problems.append("TRL is not installed: it is a benchmark-only dependency, `pip install trl`")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet_libraries()
    roots = [args.repo] if args.repo else [REPO_ROOT / d for d in DEFAULT_SOURCE_DIRS]
    unique = scan_texts(roots, args.ext)
    tokens_per_step = args.seq_len * args.batch * args.accum

    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as tmp:
        work = Path(tmp)
        tokenizer, model_config = build_model_dir(list(unique.values()), args.seq_len, work / "model")
        corpus_tokens = sum(len(ids) + 1 for ids in tokenizer(list(unique.values()))["input_ids"])
        copies = copies_needed(corpus_tokens, tokens_per_step, args.steps)
        write_corpus(unique, copies, work / "corpus")
        texts = list(scan_texts([work / "corpus"], args.ext).values())

        print(f"tiny Llama: {model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, "
              f"vocab {model_config.vocab_size}; fp32, CPU, torch {torch.__version__}, {args.threads} threads")
        print(f"corpus: {len(unique)} {'/'.join(args.ext)} files x {copies} copies = {len(texts)} files, "
              f"{corpus_tokens * copies:,} tokens")
        print(f"window {args.seq_len}, micro-batch {args.batch}, accumulation {args.accum} "
              f"({tokens_per_step:,} tokens per optimizer step); {args.steps} steps, first {args.warmup} not timed")
        print(f"versions: codetune {version('codetune')}, lightning {version('lightning')}, trl {version('trl')}, "
              f"transformers {version('transformers')}, peft {version('peft')}")

        rows = []
        for r in range(args.rounds):
            started = time.perf_counter()
            clock, hp = run_codetune(args, work / "model", work / "corpus", work / "runs", f"round{r}")
            rows.append((f"codetune (round {r + 1})", clock, os.getloadavg()[0]))
            clock = run_trl(args, work / "model", texts, hp, work / f"trl{r}")
            rows.append((f"trl SFTTrainer {args.trl_packing} (round {r + 1})", clock, os.getloadavg()[0]))
            print(f"round {r + 1}: {time.perf_counter() - started:.0f} s", flush=True)

    print()
    print(format_table(rows))
    busiest = max(load for _, _, load in rows)
    if busiest > (os.cpu_count() or 1) + 0.5:
        print(f"NOTE: load average {busiest:.1f} on {os.cpu_count()} cores: other processes shared the cores, so "
              f"the figures are noisy (OpenMP threads that wait for a busy core slow every op); rerun when the "
              f"machine is idle, or with --threads 1 and --rounds 3.")
    codetune_tokens, codetune_s = total([c for n, c, _ in rows if n.startswith("codetune")])
    trl_tokens, trl_s = total([c for n, c, _ in rows if n.startswith("trl")])
    ratio = (codetune_tokens / codetune_s) / (trl_tokens / trl_s)
    print(f"\ncodetune {codetune_tokens / codetune_s:,.0f} tokens/s, trl {trl_tokens / trl_s:,.0f} tokens/s "
          f"(all rounds): codetune/trl = {ratio:.2f}x (goal >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")


def _quiet_libraries() -> None:
    # The figures are the output; the frameworks' info logs, progress bars and deprecation notes would bury them.
    import datasets
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for module in ("lightning", "transformers", "trl", "peft"):
        warnings.filterwarnings("ignore", module=module)


if __name__ == "__main__":
    main()
