"""The command line of `python bench/gpu_check.py`: its flags, and the run from setup through the sections to the
final table. Exit status 1 when a row failed."""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .budget import Budget
from .report import Report
from .row import FAIL
from .sections import SECTIONS, run_section
from .settings import DEFAULT_BUDGET_S, REPO_ROOT, SOURCE_DIRS, dry_mode, real_mode
from .workspace import setup, vocabulary_row

DESCRIPTION = ("The GPU check: what codetune promises on a small card, measured in one command and printed as one "
               "table.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
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
