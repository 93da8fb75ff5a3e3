"""`codetune merge RUN --out DIR`: a finished run's adapter folded into its base, saved as a plain transformers model.

The base is rebuilt from the run's `config.yaml` and checked, and the adapter applied, as `codetune generate` does
(`codetune.run.tuned.load_tuned_model`: a NaN or inf in the adapter, or a local base changed since training, and
nothing is written). Then the adapter is folded into the base weights (`W + B @ A * alpha / r`, and the fully
trained `modules_to_save` layers replace theirs), and the result needs neither peft nor bitsandbytes.

The base is loaded *unquantized*, in `--dtype` (default bf16): adding the update to 4-bit NF4 weights means
re-quantizing the sum onto NF4's 16-level grid, whose spacing is larger than most of a LoRA update, so much of the
training would round away; dequantizing first would keep exactly what training saw but bake the quantization error
into a 16-bit model. A run trained on a 4-bit base therefore exports the standard QLoRA way: its adapter on the
original 16-bit weights, whose outputs differ slightly from those of the 4-bit model `generate` runs. peft adds the
fp32 update to each weight in place, rounding once to `--dtype`. The merge runs on the CPU and needs about the
model's size in `--dtype` of memory. `DIR` is written atomically and marked with `codetune_merge.json` (source run,
base, dtype, and `output_files`: every file written): a later merge may replace it when it holds only those files;
a directory holding anything else, or not marked, is refused.

`--help` and a bad flag answer at once: torch, transformers and peft (seconds to import) are imported by the
functions that use them, once the arguments are checked.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from codetune.errors import ConfigError, NonFiniteWeightsError
from codetune.storage import MERGE_MARKER, atomic_save_dir, replaceable_output_dir, utc_now, write_output_marker

if TYPE_CHECKING:  # imported where used, after the arguments are checked: torch takes seconds
    import torch

    from codetune.run.finished import RunConfig

MERGE_DTYPES = ("bfloat16", "float16", "float32")


def merge_run(config: RunConfig, out: Path, dtype: str = "bfloat16") -> Path:
    """Merge the run's adapter into its unquantized base in `dtype` and save model + tokenizer to `out`."""
    import torch

    from codetune.run.finished import load_tuned_tokenizer
    from codetune.run.tuned import load_tuned_model

    torch_dtype = getattr(torch, dtype)
    model = load_tuned_model(config, torch.device("cpu"), torch_dtype, quantize=False)
    # Unsafe merge on purpose: it adds the fp32 update in place and rounds once; peft's safe_merge
    # rounds the update to `dtype` first. Finiteness is checked on the whole model below instead.
    merged = model.merge_and_unload()
    _check_finite(merged, dtype)
    tokenizer = load_tuned_tokenizer(config)
    with atomic_save_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_output_marker(tmp, MERGE_MARKER, {
            "source_run": str(config.run_dir.resolve()), "base_model": config.name_or_path,
            "base_revision": (config.base_revision or {}).get("revision"), "dtype": dtype, "merged_at": utc_now()})
    return out


def _check_finite(model: torch.nn.Module, dtype: str) -> None:
    import torch

    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(f"the merged weights hold NaN or inf in {dtype} (e.g. {bad[0]}): nothing was "
                            f"written. Use --dtype bfloat16 or float32 (float16 overflows above 65504).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune merge",
        description="Fold a finished run's LoRA adapter into its (unquantized) base model and save a plain "
                    "transformers model + tokenizer: AutoModelForCausalLM.from_pretrained(OUT) loads it without "
                    "peft. Runs on the CPU.")
    parser.add_argument("run", help="The run directory (runs/<name>, the last line `codetune fit` prints).")
    parser.add_argument("--out", required=True,
                        help="Directory to write the merged model to (new, empty, or an earlier merge output).")
    parser.add_argument("--dtype", default="bfloat16",
                        help=f"Dtype of the merged weights: {', '.join(MERGE_DTYPES)} (default: bfloat16). A "
                             f"4-bit base is always merged unquantized.")
    return parser


def main(argv: Sequence[str]) -> int:
    """`codetune merge`: the arguments after the command's name; returns the exit status."""
    args = build_parser().parse_args(list(argv))
    from codetune.run.finished import load_run_config, trained_on_4bit

    if args.dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: use one of {', '.join(MERGE_DTYPES)} (a merged model is not "
                          f"re-quantized; load it in 4-bit with BitsAndBytesConfig if you need that).")
    config = load_run_config(args.run)
    out = replaceable_output_dir(args.out, MERGE_MARKER, "codetune merge")
    merge_run(config, out, args.dtype)
    base = "the unquantized weights of its 4-bit base" if trained_on_4bit(config.run_dir) else "its base"
    print(f"codetune merge: the adapter of {config.run_dir} merged into {base} ({config.name_or_path}), "
          f"saved in {args.dtype}", flush=True)
    print(out, flush=True)
    return 0
