"""`codetune generate RUN --prompt ...` (or `--prefix/--suffix`, `--infill`): write code with a finished run.

The run's model is rebuilt as training loaded it (`codetune.run.tuned`): the base from its `config.yaml`
(`model.name_or_path`: a hub id, a local directory, or `tiny`, whose randomly initialised base and tokenizer the
run saved in `base_model/`), with `model.quantization` and `model.dtype` resolved for the device at hand (`auto`:
4-bit NF4 on CUDA, in bf16 from compute capability 8.0 and fp16 below; fp32 on CPU), plus the LoRA adapter in
`adapter/`. The adapter is checked first: one NaN or inf in it and nothing is generated. So is the base, against
what the run's MANIFEST.json recorded (`phase_3_model.base_revision`, see `codetune/model/revision.py`): a hub id
is loaded at the commit the run trained on, not at whatever its branch points to now; a local directory (or
`base_model/`) that changed since is refused.

Each prompt is tokenized like the training files (no special tokens) and completed on its own, greedily unless
`--do_sample`, by the engine that writes the evaluation's samples (`codetune.eval.generation`); sampling is
reseeded per prompt, so a completion does not depend on the others. Settings not given here (repetition penalty,
top-k...) come from the model's generation config, as for the samples written during training.

**Fill in the middle.** A base pretrained with FIM sentinels (Qwen2.5-Coder, StarCoder, DeepSeek-Coder, Code
Llama; `codetune.data.fim` finds them by name, and 'tiny' has Qwen's) can write the code between a prefix and a
suffix, as in an editor; a run with FIM training (`--data.fim_rate`) was tuned on such requests. Two ways to ask,
each exclusive of `--prompt` and of the other:

* ``--prefix P --suffix S`` prints only the middle the model writes after the PSM request
  ``<fim_prefix> P <fim_suffix> S <fim_middle>`` (each part tokenized alone, sentinels by id), up to
  its end-of-sequence token or `--max_new_tokens`, then a line break. Both flags are required
  together; either may be ``''``. E.g.
  ``codetune generate runs/r --prefix $'fn add(a: i32, b: i32) -> i32 {\\n' --suffix $'\\n}\\n'``.
* ``--infill FILE:LINE`` masks line LINE (from 1) of FILE and prints what the model writes there
  (stderr says where, and why it stopped): the prefix and suffix are the file around the line, cut
  where the tokenizer's tokens break, as training cut its samples (`codetune.eval.infill`). Generation
  stops once the masked line has ended (the rest of the middle would be other lines). When the run trained
  with `--data.file_headers`, the request starts with the file's header ``<|file_sep|>PATH\\n``, PATH
  relative to the run's `data.repo` when FILE lies inside it (a relative `data.repo` is taken from the
  current directory, where `codetune fit` is usually run), else FILE as given. E.g.
  ``codetune generate runs/r --infill src/lib.rs:12``.

A base without FIM sentinels is refused for both, before the model loads.

**Start-up.** `--help` and a bad flag answer at once: torch, transformers and peft (seconds to import) are imported
by the functions that use them, once the arguments are checked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codetune.data.fim import fim_families_text, find_fim_tokens, line_cut_style
from codetune.errors import ConfigError
from codetune.eval.infill import cut_around_line, infill_prompt_ids, line_ended, masked_line
from codetune.eval.prompts import split_lines
from codetune.run.tuned import load_tuned_model, training_precision

if TYPE_CHECKING:  # imported where used, after the arguments are checked: torch, transformers and peft take seconds
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from codetune.data.fim import FimTokens
    from codetune.eval.generation import Decoding
    from codetune.eval.stopping import Rule
    from codetune.run.finished import RunConfig

DEVICES = ("auto", "cpu", "cuda")


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


# -- the infill target -------------------------------------------------------------------------------


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


# -- the command -------------------------------------------------------------------------------------


GENERATE_EXAMPLES = """\
examples:
  codetune generate runs/r --prompt 'fn process' --prompt 'impl Parser'
  codetune generate runs/r --prefix $'fn add(a: i32, b: i32) -> i32 {\\n' --suffix $'\\n}\\n'
  codetune generate runs/r --infill src/lib.rs:12
"""


def build_parser() -> argparse.ArgumentParser:
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


@dataclass(frozen=True)
class GenerateSettings:
    """The generation flags, checked: tokens per prompt, how tokens are chosen, and the seed sampling restarts
    from before each prompt."""

    max_new_tokens: int
    decoding: Decoding
    seed: int


def main(argv: Sequence[str]) -> int:
    """`codetune generate`: the arguments after the command's name; returns the exit status."""
    args = build_parser().parse_args(list(argv))
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
        completions = [_complete_text(model, tokenizer, prompt, settings) for prompt in args.prompt]
        print("\n\n".join(p + c for p, c in zip(args.prompt, completions)), flush=True)
    elif target is None:
        ids = infill_prompt_ids(tokenizer, fim, args.prefix, args.suffix)
        print(_generate(model, tokenizer, ids, settings)[0], flush=True)
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
                         target: InfillTarget, settings: GenerateSettings) -> None:
    """Fill in `target`'s line: the line on stdout, where it was and why generation stopped on stderr."""
    cut = cut_around_line(target.text, target.line, line_cut_style(tokenizer))
    header = header_path(target, config.repo) if config.file_headers else None
    ids = infill_prompt_ids(tokenizer, fim, cut.prefix, cut.suffix, header)
    middle, stopped = _generate(model, tokenizer, ids, settings, line_ended(cut.lead))
    reason = STOP_REASONS[stopped].format(settings.max_new_tokens)
    print(f"codetune generate: line {target.line} of {target.file}, filled in ({reason}):", file=sys.stderr,
          flush=True)
    print(masked_line(middle, cut.lead)[0], flush=True)


def _complete_text(model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompt: str,
                   settings: GenerateSettings) -> str:
    """The completion (new text only) of a prompt tokenized as the training files were."""
    from codetune.eval.generation import text_ids

    return _generate(model, tokenizer, text_ids(tokenizer, [prompt])[0], settings)[0]


def _generate(model: PeftModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], settings: GenerateSettings,
              rule: Rule | None = None) -> tuple[str, str | None]:
    """The text written after `ids` and why it stopped (`Generated.reasons`): one row, unpadded (no padding to
    perturb the numbers), the sampling reseeded first so that it does not depend on other prompts. Without a
    `rule` the row runs to its EOS or `--max_new_tokens`."""
    import torch

    from codetune.eval.generation import generate, never

    if settings.decoding.do_sample:
        torch.manual_seed(settings.seed)
    device = next(model.parameters()).device
    out = generate(model, tokenizer, [ids], [rule or never], [settings.max_new_tokens], settings.decoding, device)
    return out.completions[0].text, out.reasons[0]


def _generation_settings(args: argparse.Namespace, config: RunConfig) -> GenerateSettings:
    """The flags, else the run's generation.* values; every problem at once."""
    def pick(flag: str) -> Any:
        value = getattr(args, flag)
        return getattr(config, flag) if value is None else value

    max_new_tokens = pick("max_new_tokens")
    problems = []
    if max_new_tokens is None or max_new_tokens < 1:
        problems.append(f"--max_new_tokens={max_new_tokens}: give a positive number of tokens")
    temperature, top_p, seed = 1.0, 1.0, 0  # greedy decoding reads none of them
    if not args.do_sample:
        given = [f"--{f}" for f in ("temperature", "top_p", "seed") if getattr(args, f) is not None]
        if given:
            problems.append(f"{', '.join(given)} only apply with --do_sample (decoding is greedy without it)")
    else:
        temperature, top_p, seed = pick("temperature"), pick("top_p"), pick("seed") or 0
        if temperature is None or not temperature > 0:
            problems.append(f"--temperature={temperature}: must be > 0 (e.g. 0.8)")
        if top_p is None or not 0 < top_p <= 1:
            problems.append(f"--top_p={top_p}: must be in (0, 1] (e.g. 0.95)")
    empty = [i + 1 for i, p in enumerate(args.prompt or []) if not p]
    if empty:
        problems.append(f"--prompt number {empty[0]} is empty: give the start of the code to complete")
    if problems:
        raise ConfigError("; ".join(problems))
    from codetune.eval.generation import Decoding

    return GenerateSettings(max_new_tokens, Decoding(args.do_sample, temperature, top_p), seed)


def _device(name: str) -> torch.device:
    import torch

    if name not in DEVICES:
        raise ConfigError(f"--device {name!r}: use one of {', '.join(DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to PyTorch. Use --device cpu (or auto).")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
