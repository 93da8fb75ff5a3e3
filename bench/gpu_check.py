"""The GPU check: what codetune promises on a small card, measured in one command and printed as one table.

Run from the repository root on a CUDA machine::

    python bench/gpu_check.py --out gpu_check.json            # or: make gpu-check
    python bench/gpu_check.py --dry-run --out dry.json        # the same sections on CPU, tiny shapes (75 s)
    python bench/gpu_check.py --sections a,d                  # a subset (a rerun on a short lease)

**Layout.** This file is the entry point only: it puts `bench/` (for the check's package and the throughput
bench's corpus writer) and the checkout (for codetune and callbacks, installed or not) on `sys.path` and runs
`gpucheck.command.main`. The check itself is the package `bench/gpucheck/`, spelled without the underscore on
purpose: the tests load this script as a module named `gpu_check`, and Python puts `bench/` first on the path when
it runs it, so a package `bench/gpu_check/` would collide with the script's own name (`import gpu_check.x` would
find one where the other was meant). Its modules::

    settings.py     paths, model shapes, the flags of every fit, card peaks, tolerances, section titles and
                    budget shares; Mode (real or dry-run sizes) and FitSpec (one fit)
    row.py          one line of the table, its statuses and number formats
    budget.py       Budget and BudgetSpent: --budget-s shared between the sections, checked before each unit
    recorder.py     StepRecorder, the callback every fit carries
    fits.py         Context (what the sections share), run_fit (`codetune fit` in this process), budgeted
    arithmetic.py   FLOPs per token, card peaks, loss verdicts, the OOM cap, peaks against the plan (pure)
    planning.py     the VRAM plan of a fit, and the largest micro-batch the emulated card fits
    turing.py  training.py  oom.py  precision.py  isolation.py  use.py  gpu_tests.py
                    sections t, a, b, c, d, e, f: each module's docstring says what it measures and its criteria
    sections.py     SECTIONS by letter, and running one within the budget
    workspace.py    setup: the random model, its tokenizer, the corpus copies, the CUDA context
    report.py       the tables on stdout and the JSON (--out)
    command.py      the flags, and main

**Time.** Not yet measured on a card; what bounds it is the budget. `--budget-s` (480 s by default) is
shared between the sections run in the proportions of `SECTION_BUDGET_S` (all seven: Turing path 70 s,
training 170, OOM 60, fp16 50, isolation 35, generate/merge 50, GPU tests 45; `--sections a` gives section a
all of it). Before each unit of work (a fit, a row) a section checks its share and the total: when either is
spent, the units left become `skipped: budget` rows that name the section's cap, the seconds spent and what was
not run, and a section that starts after the total is spent is one such row. A unit already running is not
interrupted: a fit cannot be stopped mid-run, so a section overruns its share by at most the last unit it
started (the GPU tests' subprocess alone is stopped, at the section's time left). Outside the budget are the
imports, the setup (its seconds are in the setup row) and the final table: a 600 s command keeps 2 minutes for
them, that overrun and copying the results back. The dry run's wall time and each section's share are in
bench/README.md.

**Model.** A randomly initialised model of the real Qwen2.5-Coder-1.5B architecture (hidden 1536, 28
layers, 12 query / 2 key-value heads of 128, MLP 8960, vocabulary 151,936, tied embeddings; from
`bench/models/qwen2.5-coder-1.5b/config.json` when that file exists, else from the same values in
code), saved in bf16 with `save_pretrained` into a temporary directory together with a byte-level BPE
tokenizer trained on the corpus (`codetune.data.tokenizer.train_tokenizer`, 8,192 tokens). The model's
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

t. **The Turing path on this card**: the Rust config at its own micro-batch as an RTX 2060 trains it (compute
   capability 7.5, flash and cuDNN SDPA off, float16 under a GradScaler, the 6 GiB cap); no math-kernel
   attention call, finite losses, peak within 10% of the plan.
a. **Training** with both shipped configs, as shipped and at the largest micro-batch the plan fits on the
   emulated card: peaks against the VRAM plan (within 10%), tokens/s, MFU and HFU (the FLOP formula is in
   `gpucheck/training.py`), a falling held-out loss.
b. **A real OOM** under a cap between two plans, recovered by `callbacks/oom_backoff.py` at half the
   micro-batch, ending at the loss of a run started there.
c. **The Turing path forced**: float16 (16-mixed, GradScaler) against bf16, the adapters' updates agreeing.
d. **Packed-window isolation at batch > 1** for sdpa, eager and flash_attention_2, with a concat control.
e. **`codetune generate`** (NF4 on CUDA) and **`codetune merge`**, the merged logits against base + adapter.
f. **GPU tests**: `pytest -m gpu tests/gpu` (CUDA only).

Output: as setup and then each section ends, a small table of its rows on stdout (flushed), and with `--out
FILE` the JSON rewritten whole (a temporary sibling, then a rename) with every row so far, `setup_s`,
`section_s` (each finished section's seconds), `budget` (the total, and for each section its cap, seconds
spent, whether the budget was hit and what was not run) and `complete` (true only in the last write): a
command stopped by its time limit still leaves the sections it finished. At the end, the full table.
`rows[*].figures` holds every number. Exit status 1 when a row failed. A section that raises becomes a FAIL
row (the traceback goes to stderr) and the next section runs.

A new section is a module of `gpucheck/` whose docstring says what it measures, and one entry in each of
`SECTIONS` (sections.py), `SECTION_TITLES` and `SECTION_BUDGET_S` (settings.py); its rows go through
`budgeted`, and its fits through `run_fit`, which checks the budget.
"""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the check's package, gpucheck, and the throughput bench's corpus writer
sys.path.insert(0, str(BENCH.parent))  # codetune and callbacks import from the checkout, installed or not

from gpucheck.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
