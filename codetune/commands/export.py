"""`codetune export RUN --to gguf|ollama|vllm [--out DIR]`: a finished run's LoRA adapter, ready for llama.cpp,
Ollama or vLLM, with nothing to download or compile.

What each target writes, and what it refuses, is in its module of `codetune.export`: `gguf` (`adapter.gguf`, a
GGUF LoRA adapter for llama.cpp), `ollama` (that file and a `Modelfile`), `vllm` (the checked peft adapter).

Every export checks the adapter for NaN and inf first, writes `--out` (default `RUN/export/<target>`)
atomically, marks it with `codetune_export.json`, whose `output_files` lists the files it wrote (a later export
may replace them, whatever its target; a directory holding anything else, or not marked, is refused: see
`codetune.storage.replaceable_output_dir`), and records itself in the run's MANIFEST.json under
`phase_7_export.exports` (`codetune.export.record`): format, directory, and each file's size and sha256 (an
export to the same directory replaces its entry).
`--help` and a bad flag answer before torch is imported: the functions that need it import it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from codetune.errors import ConfigError
from codetune.export.adapter import Adapter, read_adapter
from codetune.export.gguf import GGUF_TYPES, export_gguf
from codetune.export.ollama import export_ollama
from codetune.export.record import Exported, file_records, record_export
from codetune.export.vllm import export_vllm
from codetune.storage import EXPORT_MARKER, atomic_save_dir, replaceable_output_dir, utc_now, write_output_marker
from codetune.run.directory import relative_to_run

if TYPE_CHECKING:
    from codetune.run.finished import RunConfig

TARGETS = ("gguf", "ollama", "vllm")


def export_run(config: RunConfig, target: str, out: Path, outtype: str = "f32", base: str | None = None) -> Exported:
    """Export `config`'s run to `out` (atomically) and record it in the run's manifest."""
    from codetune.run.finished import check_adapter_finite, check_base

    started, start = utc_now(), time.perf_counter()
    check_adapter_finite(config.adapter_dir)
    check_base(config)
    adapter = read_adapter(config.adapter_dir)
    with atomic_save_dir(out) as tmp:
        exported = _write(config, adapter, target, tmp, out, outtype, base)
        files = file_records(tmp)
        write_output_marker(tmp, EXPORT_MARKER, {"source_run": str(config.run_dir.resolve()), "format": target,
                                                 "base_model": config.name_or_path, "exported_at": utc_now(),
                                                 "files": files})
    # Relative to the run when inside it (the default, RUN/export/<to>): the run can move with its exports.
    record_export(config.run_dir, {"format": target, "out": relative_to_run(out, config.run_dir),
                                   "started_at": started, "wall_s": round(time.perf_counter() - start, 3),
                                   "files": files, **exported.details})
    return exported


def _write(config: RunConfig, adapter: Adapter, target: str, tmp: Path, out: Path, outtype: str,
           base: str | None) -> Exported:
    """Write `target`'s files into `tmp`, the directory that becomes `out`."""
    if target == "vllm":
        return export_vllm(config, adapter, tmp, out)
    if target == "ollama":
        return export_ollama(config, adapter, tmp, out, outtype, base)
    return export_gguf(config, adapter, tmp, out, outtype)


EXAMPLES = """\
examples:
  codetune export runs/r --to ollama          # adapter.gguf + Modelfile in runs/r/export/ollama
  codetune export runs/r --to gguf --outtype q8_0 --out ~/models/r-lora
  codetune export runs/r --to vllm
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune export", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a finished run's LoRA adapter for llama.cpp (--to gguf), Ollama (--to ollama: the GGUF\n"
                    "adapter and a Modelfile) or vLLM (--to vllm: the checked peft adapter), and print the commands\n"
                    "that serve it. Nothing is downloaded or compiled.")
    parser.add_argument("run", help="The run directory (runs/<name>, the last line `codetune fit` prints).")
    parser.add_argument("--to", required=True, choices=TARGETS, help="What to export for.")
    parser.add_argument("--out", default=None,
                        help="Directory to write (new, empty, or an earlier export); default RUN/export/<target>.")
    parser.add_argument("--outtype", default=None, choices=GGUF_TYPES,
                        help="Type of the GGUF tensors, with --to gguf or ollama (default f32, as llama.cpp's "
                             "converter; f16 can overflow in llama.cpp on large activations). q8_0 keeps f16 for "
                             "tensors whose rows are not a multiple of 32 values.")
    parser.add_argument("--base", default=None,
                        help="With --to ollama: what the Modelfile's FROM names, an Ollama model (e.g. "
                             "qwen2.5-coder:1.5b-base) or the path of a GGUF of the base. Default: the base's Ollama "
                             "library name when codetune knows it, or its local directory.")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    # Only now: the run's code imports torch (seconds), which `--help` and a bad flag need not wait for.
    from codetune.run.finished import load_run_config

    if args.outtype is not None and args.to == "vllm":
        raise ConfigError("--outtype is for --to gguf or ollama; --to vllm copies the adapter as trained.")
    if args.base is not None and args.to != "ollama":
        raise ConfigError("--base is for --to ollama (the Modelfile's FROM); llama.cpp and vLLM take the base on "
                          "their own command line, printed at the end.")
    config = load_run_config(args.run)
    out = replaceable_output_dir(args.out or str(config.run_dir / "export" / args.to), EXPORT_MARKER,
                                 "codetune export")
    exported = export_run(config, args.to, out, args.outtype or "f32", args.base)
    print(f"codetune export: {config.run_dir} for {args.to} in {out}", file=sys.stderr, flush=True)
    for line in exported.next_steps:
        print(f"  {line}", file=sys.stderr, flush=True)
    print(out, flush=True)
    return 0
