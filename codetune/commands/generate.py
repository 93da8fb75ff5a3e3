"""Using a finished run: `codetune generate RUN --prompt ...` (or `--prefix/--suffix`, `--infill`) and
`codetune merge RUN --out DIR`.

Both rebuild the base model from the run's `config.yaml` (`model.name_or_path`: a hub id, a local
directory, or `tiny`, whose randomly initialised base and tokenizer the run saved in `base_model/`)
and apply the LoRA adapter in `adapter/` with peft, exactly as `PeftModel.from_pretrained` would.
The adapter is checked first: one NaN or inf in it and nothing is generated or written. So is the
base, against what the run's MANIFEST.json recorded (`phase_3_model.base_revision`, see
`codetune/model/revision.py`): a hub id is loaded at the commit the run trained on, not at whatever
its branch points to now; a local directory (or `base_model/`) that changed since is refused.

**generate** loads the base as training did: `model.quantization` and `model.dtype` are resolved
for the device at hand (`auto`: 4-bit NF4 on CUDA, in bf16 from compute capability 8.0 and fp16 below; fp32
on CPU). Each prompt
is tokenized like the training files (no special tokens) and completed on its own, greedily unless
`--do_sample`; sampling is reseeded per prompt, so a completion does not depend on the others.
Settings not given here (repetition penalty, top-k...) come from the model's generation config, as
for the samples written during training.

**generate, fill in the middle.** A base pretrained with FIM sentinels (Qwen2.5-Coder, StarCoder,
DeepSeek-Coder, Code Llama; `codetune.data.fim` finds them by name, and 'tiny' has Qwen's) can write
the code between a prefix and a suffix, as in an editor; a run with FIM training (`--data.fim_rate`)
was tuned on such requests. Two ways to ask, each exclusive of `--prompt` and of the other:

* ``--prefix P --suffix S`` prints only the middle the model writes after the PSM request
  ``<fim_prefix> P <fim_suffix> S <fim_middle>`` (each part tokenized alone, sentinels by id), up to
  its end-of-sequence token or `--max_new_tokens`, then a line break. Both flags are required
  together; either may be ``''``. E.g.
  ``codetune generate runs/r --prefix $'fn add(a: i32, b: i32) -> i32 {\n' --suffix $'\n}\n'``.
* ``--infill FILE:LINE`` masks line LINE (from 1) of FILE and prints what the model writes there
  (stderr says where, and why it stopped): the prefix and suffix are the file around the line, cut
  where the tokenizer's tokens break (`line_cut_style`), as training cut its samples. "after" (Qwen):
  prefix ends with the previous line's line break, middle is the line with its own; "before" (GPT-2's
  byte-level BPE, 'tiny'): prefix ends at the previous line's end, middle is that line break, then the
  line. Generation stops once the masked line has ended (the rest of the middle would be other
  lines). When the run trained with `--data.file_headers`, the request starts with the file's header
  ``<|file_sep|>PATH\n``, PATH relative to the run's `data.repo` when FILE lies inside it (a relative
  `data.repo` is taken from the current directory, where `codetune fit` is usually run), else FILE as
  given. E.g. ``codetune generate runs/r --infill src/lib.rs:12``.

A base without FIM sentinels is refused for both, before the model loads.

**merge** folds the adapter into the base weights (`W + B @ A * alpha / r`, and the fully trained
`modules_to_save` layers replace theirs) and saves a plain transformers model that needs neither
peft nor bitsandbytes. The base is loaded *unquantized*, in `--dtype` (default bf16): adding the
update to 4-bit NF4 weights means re-quantizing the sum onto NF4's 16-level grid, whose spacing is
larger than most of a LoRA update, so much of the training would round away; dequantizing first would
keep exactly what training saw but bake the quantization error into a 16-bit model. A run trained on
a 4-bit base therefore exports the standard QLoRA way: its adapter on the original 16-bit weights,
whose outputs differ slightly from those of the 4-bit model `generate` runs. peft adds the fp32
update to each weight in place, rounding once to `--dtype`. The merge runs on the CPU and needs
about the model's size in `--dtype` of memory. `DIR` is written atomically and marked with
`codetune_merge.json` (source run, base, dtype, and `output_files`: every file written): a later merge may
replace it when it holds only those files; a directory holding anything else, or not marked, is refused.

**Start-up.** `--help` and a bad flag answer at once: torch, transformers and peft (seconds to import) are imported
by the functions that use them, once the arguments are checked. Loading the model hides two notices the libraries
print on every load and nothing else (`quiet_model_libraries`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.data.fim import fim_families_text, find_fim_tokens, line_cut_style
from codetune.errors import ConfigError, NonFiniteWeightsError
from codetune.eval.prompts import split_lines
from codetune.storage import MERGE_MARKER, atomic_save_dir, replaceable_output_dir, utc_now, write_output_marker

if TYPE_CHECKING:  # imported where used, after the arguments are checked: torch, transformers and peft take seconds
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from codetune.data.fim import CutStyle, FimTokens
    from codetune.eval.stopping import CompletionStop
    from codetune.run.finished import RunConfig

MERGE_DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
# Two notices the model libraries print on every load, which ask nothing of the user, matched exactly. bitsandbytes
# logs the first when it is imported on a CPU with AVX512-BF16 and the optional `kernels` package is not installed:
# its own CPU code serves instead, and that code runs only for a base forced to 4-bit on a CPU (--model.quantization
# nf4). transformers warns the second when peft reads the deprecated `is_gradient_checkpointing` of a model it wraps.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NO_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
GRADIENT_CHECKPOINTING_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `start`."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextmanager
def quiet_model_libraries() -> Iterator[None]:
    """Within: bitsandbytes' `BNB_NO_KERNELS` record and transformers' `GRADIENT_CHECKPOINTING_DEPRECATION`
    FutureWarning are not shown; every other record of that logger, and every other warning, still is."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    drop = _DropMessage(BNB_NO_KERNELS)
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(GRADIENT_CHECKPOINTING_DEPRECATION),
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


def load_tuned_model(config: RunConfig, device: torch.device, dtype: torch.dtype, quantize: bool) -> PeftModel:
    """The run's base (4-bit NF4 when `quantize`) in `dtype` on `device`, with its adapter, in eval mode."""
    import torch

    from codetune.run.finished import check_adapter_finite, check_base, pinned
    from codetune.model.float16 import scale_residual_stream
    from codetune.model.loading import load_causal_lm

    check_adapter_finite(config.adapter_dir)
    check_base(config)
    # Both notices come from here: bitsandbytes is imported by peft, or by transformers for a 4-bit base.
    with quiet_model_libraries():
        from peft import PeftModel

        base = load_causal_lm(config.base_source, quantize, dtype, config.trust_remote_code,
                              config.attn_implementation, device, **pinned(config))
        if not quantize:
            base = base.to(device)  # a 4-bit base is placed while loading
        model = PeftModel.from_pretrained(base, str(config.adapter_dir), is_trainable=False)
    if dtype == torch.float16 and config.float16_residual_scale > 1:
        # As in training: float16's range holds the residual stream only scaled (codetune/model/float16.py).
        scale_residual_stream(model, config.float16_residual_scale)
    return model.eval()


def training_precision(config: RunConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(4-bit?, compute dtype) that training used on a device of this type (and, on CUDA, this card)."""
    from codetune.model.loading import cuda_capability, resolve_dtype, resolve_quantization

    cuda = device.type == "cuda"
    return resolve_quantization(config.quantization, cuda), resolve_dtype(
        config.dtype, device.type, cuda_capability(device) if cuda else None)


def generate_completions(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                         prompts: Sequence[str], max_new_tokens: int, do_sample: bool = False,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The completion (new text only) of each prompt, one prompt at a time (no padding to perturb the numbers)."""
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                "top_p": top_p, "seed": seed}
    return [tokenizer.decode(generate_ids(model, tokenizer, tokenizer(p, add_special_tokens=False)["input_ids"],
                                          **settings), skip_special_tokens=True) for p in prompts]


def generate_ids(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int],
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, stop: CompletionStop | None = None) -> list[int]:
    """The new token ids after `prompt_ids`: up to EOS, `max_new_tokens`, or `stop` (a one-row criterion)."""
    import torch
    from transformers import StoppingCriteriaList

    from codetune.data.tokens import pad_token_id

    ids = torch.tensor([list(prompt_ids)], device=next(model.parameters()).device)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    if do_sample:
        torch.manual_seed(seed)
    if stop is not None:
        sampling["stopping_criteria"] = StoppingCriteriaList([stop])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, pad_token_id=pad_token_id(tokenizer), **sampling)
    return out[0, ids.shape[1]:].tolist()


def merge_run(config: RunConfig, out: Path, dtype: str = "bfloat16") -> Path:
    """Merge the run's adapter into its unquantized base in `dtype` and save model + tokenizer to `out`."""
    import torch

    from codetune.run.finished import load_tuned_tokenizer

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


# -- fill in the middle ------------------------------------------------------------------------------


def require_fim_tokens(tokenizer: PreTrainedTokenizerBase, config: RunConfig, flag: str) -> FimTokens:
    """The base's FIM sentinels; a base without them is refused, naming `flag` (the infill flag given)."""
    from codetune.data.tokenizer import TINY_NAME

    fim = find_fim_tokens(tokenizer)
    if fim is None:
        raise ConfigError(f"{flag}: the base {config.name_or_path!r} has no fill-in-the-middle tokens (looked for "
                          f"{fim_families_text()}), so it cannot infill. Use --prompt to complete code left to "
                          f"right, or train a run on a code model that has them (e.g. Qwen/Qwen2.5-Coder-1.5B)"
                          f"{_TINY_WITHOUT_FIM if config.name_or_path == TINY_NAME else ''}.")
    return fim


# 'tiny' runs trained before its tokenizer had Qwen's sentinels (codetune.model.tiny) have none.
_TINY_WITHOUT_FIM = "; a 'tiny' run trained before 'tiny' had them: train it again"


def infill_prompt_ids(tokenizer: PreTrainedTokenizerBase, fim: FimTokens, prefix: str, suffix: str,
                      path: str | None = None) -> list[int]:
    """The ids of a PSM request, laid out as training's FIM samples: [<file_sep> path\\n] <prefix> P <suffix> S
    <middle> (no header when `path` is None), each text part tokenized alone as training tokenized files, and
    each sentinel by id."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    header = [] if path is None else [_file_sep(fim), *encode(f"{path}\n")]
    return [*header, fim.prefix, *encode(prefix), fim.suffix, *encode(suffix), fim.middle]


def _file_sep(fim: FimTokens) -> int:
    if fim.file_sep is None:
        raise ConfigError(f"the run trained with data.file_headers true, but its {fim.family} tokenizer has no file "
                          f"separator token to start the request with: its config.yaml does not match its base.")
    return fim.file_sep


@dataclass(frozen=True)
class LineCut:
    """A file cut around one line for an infill request: `prefix + middle + suffix` is the file.

    `middle` is what a perfect model writes: the line, with the line break that the cut style puts in the
    middle. `lead` is the line break the middle starts with ("before" style after line 1, else '')."""

    prefix: str
    middle: str
    suffix: str
    lead: str


def cut_around_line(text: str, line: int, style: CutStyle) -> LineCut:
    """Mask line `line` (1-based, within `split_lines`) of `text`, cut as the tokenizer breaks tokens: "after",
    both cuts at line starts; "before", both at line ends (the middle starts with the previous line's break)."""
    from codetune.eval.fim import mask_lines

    prefix, middle, suffix = mask_lines(text, line - 1, line - 1, style)
    lead = "" if style == "after" else middle[:len(middle) - len(middle.lstrip("\r\n"))][:2]
    return LineCut(prefix, middle, suffix, lead)


def masked_line(middle: str, lead: str) -> tuple[str, bool]:
    """The masked line in a generated middle: (its text, whether its line break was written). The middle's
    `lead` (or a start of it) is skipped: a model writing the line's own line break first has ended nothing."""
    body = middle[len(os.path.commonprefix([middle, lead])):]
    line = body.splitlines(keepends=True)[0] if body else ""
    content = line.splitlines()[0] if line else ""
    return content, len(content) < len(line)


def line_stop(tokenizer: PreTrainedTokenizerBase, prompt_width: int, lead: str, cap: int) -> CompletionStop:
    """Stop a one-row generation once `masked_line` holds a line break (the rest of the middle is other lines)."""
    from codetune.eval.stopping import CompletionStop

    return CompletionStop(tokenizer, prompt_width, rules=[lambda text: masked_line(text, lead)[1]], caps=[cap])


@dataclass(frozen=True)
class InfillTarget:
    """`--infill FILE:LINE`, checked: the file as given, its UTF-8 text, and a line it has."""

    file: str
    line: int
    text: str


def read_infill_target(value: str) -> InfillTarget:
    """Parse and check `--infill FILE:LINE`; every problem is one ConfigError naming the flag."""
    file, colon, line = value.rpartition(":")
    example = "e.g. --infill src/lib.rs:12"
    if not colon or not file:
        raise ConfigError(f"--infill {value!r}: give FILE:LINE, the file and the number of the line to fill in, "
                          f"{example}.")
    if not (line.isascii() and line.isdigit() and int(line) > 0):
        raise ConfigError(f"--infill {value!r}: LINE {line!r} is not a positive integer (lines count from 1), "
                          f"{example}.")
    path = Path(file).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"--infill {value!r}: {file} {what}. Give a source file and a line of it, {example}.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--infill {value!r}: {file} is not UTF-8 text (byte {err.start} is not valid UTF-8); "
                          f"infill reads source files as UTF-8.") from None
    lines = len(split_lines(text))
    if int(line) > lines:
        has = "is empty" if not lines else f"has {lines} line{'s' * (lines > 1)}"
        raise ConfigError(f"--infill {value!r}: {file} {has}; give a LINE from 1 to {lines} ({example}).")
    return InfillTarget(file, int(line), text)


def header_path(target: InfillTarget, repo: str | None) -> str:
    """The path in the request's file header: relative to the run's `repo` when the file lies inside it (as
    training wrote it, posix), else the file as given."""
    file = Path(target.file).expanduser().resolve()
    root = Path(repo).expanduser().resolve() if repo else None
    return file.relative_to(root).as_posix() if root is not None and file.is_relative_to(root) else target.file


# -- commands ----------------------------------------------------------------------------------------


GENERATE_EXAMPLES = """\
examples:
  codetune generate runs/r --prompt 'fn process' --prompt 'impl Parser'
  codetune generate runs/r --prefix $'fn add(a: i32, b: i32) -> i32 {\\n' --suffix $'\\n}\\n'
  codetune generate runs/r --infill src/lib.rs:12
"""


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune generate", epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write code with a finished run: its base model (as training loaded it) plus its LoRA\n"
                    "adapter. Give exactly one of --prompt (complete left to right), --prefix with --suffix\n"
                    "(fill in the middle) or --infill (fill in one line of a file); the last two need a base\n"
                    "with fill-in-the-middle tokens.")
    parser.add_argument("run", help="The run directory (runs/<name>, the last line `codetune fit` prints).")
    parser.add_argument("--prompt", action="append", default=None,
                        help="Code to complete, e.g. 'fn process'. Repeat for several prompts. Prints each prompt "
                             "followed by its completion; several are separated by a blank line.")
    parser.add_argument("--prefix", default=None,
                        help="Fill in the middle: the code before the gap (with --suffix; may be ''). Prints only "
                             "the middle the model writes, up to its end of sequence or --max_new_tokens. A value "
                             "that starts with '-' is given as --prefix=VALUE (likewise --suffix).")
    parser.add_argument("--suffix", default=None,
                        help="Fill in the middle: the code after the gap (with --prefix; may be '').")
    parser.add_argument("--infill", default=None, metavar="FILE:LINE",
                        help="Mask line LINE (from 1) of FILE and print what the model writes there, e.g. "
                             "src/lib.rs:12; stderr says where and why it stopped (the line's end, EOS or "
                             "--max_new_tokens). The request starts with the file's header when the run trained "
                             "with data.file_headers.")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="Tokens to generate per prompt (default: the run's generation.max_new_tokens).")
    parser.add_argument("--do_sample", action="store_true",
                        help="Sample instead of decoding greedily (greedy is the default, whatever the run's "
                             "generation.do_sample).")
    parser.add_argument("--temperature", type=float, default=None,
                        help="Sampling temperature, with --do_sample (default: the run's generation.temperature).")
    parser.add_argument("--top_p", type=float, default=None,
                        help="Nucleus sampling mass, with --do_sample (default: the run's generation.top_p).")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed of the sampling, per prompt, with --do_sample (default: the run's generation.seed).")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu or cuda. The run's model.quantization and model.dtype "
                             "resolve for it as in training (auto: 4-bit NF4 on CUDA, bf16 from compute capability "
                             "8.0, fp16 below; fp32 on CPU).")
    return parser


PROMPT, PREFIX_SUFFIX, INFILL = "--prompt", "--prefix/--suffix", "--infill"
STOP_REASONS = {"complete": "the line ended", "cap": "cut at --max_new_tokens={}: the line may go on",
                None: "the model ended the middle"}


def main_generate(argv: Sequence[str]) -> int:
    args = build_generate_parser().parse_args(list(argv))
    from codetune.run.finished import load_run_config, load_tuned_tokenizer

    mode = _generate_mode(args)
    target = read_infill_target(args.infill) if mode == INFILL else None
    device = _device(args.device)
    config = load_run_config(args.run)
    settings = _generation_settings(args, config)
    tokenizer = load_tuned_tokenizer(config)
    fim = None if mode == PROMPT else require_fim_tokens(tokenizer, config, mode)
    quantize, dtype = training_precision(config, device)
    model = load_tuned_model(config, device, dtype, quantize)
    if fim is None:
        completions = generate_completions(model, tokenizer, args.prompt, **settings)
        print("\n\n".join(p + c for p, c in zip(args.prompt, completions)), flush=True)
    elif target is None:
        ids = infill_prompt_ids(tokenizer, fim, args.prefix, args.suffix)
        print(tokenizer.decode(generate_ids(model, tokenizer, ids, **settings), skip_special_tokens=True), flush=True)
    else:
        _print_infilled_line(model, tokenizer, fim, config, target, settings)
    return 0


def _generate_mode(args: argparse.Namespace) -> str:
    """Which one of the exclusive ways to ask was given: PROMPT, PREFIX_SUFFIX or INFILL."""
    if (args.prefix is None) != (args.suffix is None):
        given, missing = ("--prefix", "--suffix") if args.suffix is None else ("--suffix", "--prefix")
        raise ConfigError(f"{given} needs {missing}: fill-in-the-middle takes the code on both sides of the gap "
                          f"(give {missing} '' when that side is empty).")
    given = [flag for flag, value in ((PROMPT, args.prompt), (PREFIX_SUFFIX, args.prefix), (INFILL, args.infill))
             if value is not None]
    if len(given) != 1:
        problem = "nothing to generate" if not given else f"{' and '.join(given)} exclude each other"
        raise ConfigError(f"{problem}: give one of --prompt TEXT (complete it), --prefix TEXT --suffix TEXT "
                          f"(fill in between) or --infill FILE:LINE (fill in that line of FILE).")
    return given[0]


def _print_infilled_line(model: PeftModel, tokenizer: PreTrainedTokenizerBase, fim: FimTokens, config: RunConfig,
                         target: InfillTarget, settings: dict[str, Any]) -> None:
    """Fill in `target`'s line: the line on stdout, where it was and why generation stopped on stderr."""
    cut = cut_around_line(target.text, target.line, line_cut_style(tokenizer))
    header = header_path(target, config.repo) if config.file_headers else None
    ids = infill_prompt_ids(tokenizer, fim, cut.prefix, cut.suffix, header)
    stop = line_stop(tokenizer, len(ids), cut.lead, settings["max_new_tokens"])
    middle = tokenizer.decode(generate_ids(model, tokenizer, ids, **settings, stop=stop), skip_special_tokens=True)
    reason = STOP_REASONS[stop.reasons[0]].format(settings["max_new_tokens"])
    print(f"codetune generate: line {target.line} of {target.file}, filled in ({reason}):", file=sys.stderr,
          flush=True)
    print(masked_line(middle, cut.lead)[0], flush=True)


def _generation_settings(args: argparse.Namespace, config: RunConfig) -> dict[str, Any]:
    """Generation keyword arguments: the flags, else the run's generation.* values; every problem at once."""
    def pick(flag: str) -> Any:
        value = getattr(args, flag)
        return getattr(config, flag) if value is None else value

    settings = {"max_new_tokens": pick("max_new_tokens"), "do_sample": args.do_sample}
    problems = []
    if settings["max_new_tokens"] is None or settings["max_new_tokens"] < 1:
        problems.append(f"--max_new_tokens={settings['max_new_tokens']}: give a positive number of tokens")
    if not args.do_sample:
        given = [f"--{f}" for f in ("temperature", "top_p", "seed") if getattr(args, f) is not None]
        if given:
            problems.append(f"{', '.join(given)} only apply with --do_sample (decoding is greedy without it)")
    else:
        settings.update(temperature=pick("temperature"), top_p=pick("top_p"), seed=pick("seed") or 0)
        if settings["temperature"] is None or not settings["temperature"] > 0:
            problems.append(f"--temperature={settings['temperature']}: must be > 0 (e.g. 0.8)")
        if settings["top_p"] is None or not 0 < settings["top_p"] <= 1:
            problems.append(f"--top_p={settings['top_p']}: must be in (0, 1] (e.g. 0.95)")
    empty = [i + 1 for i, p in enumerate(args.prompt or []) if not p]
    if empty:
        problems.append(f"--prompt number {empty[0]} is empty: give the start of the code to complete")
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def _device(name: str) -> torch.device:
    import torch

    if name not in DEVICES:
        raise ConfigError(f"--device {name!r}: use one of {', '.join(DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to PyTorch. Use --device cpu (or auto).")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_merge_parser() -> argparse.ArgumentParser:
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


def main_merge(argv: Sequence[str]) -> int:
    args = build_merge_parser().parse_args(list(argv))
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
