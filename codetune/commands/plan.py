"""`codetune plan`: the VRAM plan of a training config, before anything is downloaded or loaded.

    codetune plan --config configs/training_config.yaml --vram 6GiB
    codetune plan --config rust --model.name_or_path bench/models/qwen2.5-coder-1.5b --vram 6GiB --capability 7.5
    codetune plan --config configs/training_config_rust.yaml --model.name_or_path bench/models/qwen2.5-coder-1.5b --json

The command line is `fit`'s (configs composed with repeated `--config`, `--model.*` / `--data.*`
overrides), parsed by the same Lightning CLI parser, so unset knobs take the defaults of the real
`CodeLoRAModule` / `CodeDataModule` signatures; three flags are the command's own: `--vram SIZE` (the
card's free memory, e.g. 6GiB; without it, the free memory of the CUDA card present), `--capability X.Y`
(the card's compute capability, e.g. 7.5 for an RTX 2060; without it, the card present's, else 7.5, the
smallest card codetune plans for, whose plan is never smaller) and `--json`.
Of the model only its `config.json` is read: from a local directory, or from the Hugging Face cache
for a hub id (nothing is downloaded).

The plan is the one `fit` makes on CUDA (`codetune.memory.shapes.training_shape_for` builds both):
`--model.quantization auto` is NF4, `--model.dtype auto` the 16-bit dtype of the card (bf16 from
compute capability 8.0, fp16 below it, with the residual stream scaled), the attention kernels those of
the card (`codetune.model.kernels`: flash needs 8.0; a bf16 run on a card without it is refused), and
`--model.optimizer auto` bitsandbytes' 8-bit AdamW (`paged_adamw_8bit` plans the same bytes: paged
state is counted as resident). `--model.gradient_checkpointing auto`
and `--data.batch_size auto` are decided as `fit` decides them, against the free memory of the
card before loading (the command loads nothing).

Importing Lightning (seconds) cannot be avoided here: the defaults come from the real classes.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from codetune.data.model_source import local_model_dir
from codetune.errors import ConfigError, exit_status
from codetune.model.kernels import parse_capability
from codetune.memory.estimate import plan_memory
from codetune.memory.persistent import CUDA_CONTEXT_BYTES
from codetune.memory.report import format_plan
from codetune.memory.search import largest_fitting, plan_for_card
from codetune.memory.shapes import ALLOCATOR_MARGIN, MemoryPlan, MicroBatchChoice, ModelShape, training_shape_for
from codetune.memory.units import GiB, MiB, gib, gib_figure

USAGE = ("usage: codetune plan --config FILE [--config FILE ...] [--model.name_or_path DIR_OR_ID] [--vram SIZE] "
         "[--capability X.Y] [--json] [--model.* / --data.* overrides]")
# Without --capability and without a card: Turing, the smallest card codetune plans for (fp16, no flash kernel).
ASSUMED_CAPABILITY = (7, 5)
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>GiB|MiB|GB|MB)", re.IGNORECASE)
_UNITS = {"gib": GiB, "mib": MiB, "gb": 10**9, "mb": 10**6}


@dataclass(frozen=True)
class PlanOptions:
    """The command's own flags; everything else is a `fit` flag."""

    vram_bytes: int | None
    """--vram: the card's free memory; None reads it from the CUDA card present."""
    json: bool
    """--json: one JSON object on stdout instead of the table."""
    configs: tuple[str, ...]
    """The --config files, in order (for the report)."""
    capability: tuple[int, int] | None = None
    """--capability: the card's compute capability; None reads it from the card present."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `codetune plan`; bad input is one message on stderr and status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return exit_status(lambda: run(argv), "codetune plan")


def run(argv: Sequence[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    options, fit_args = split_plan_flags(argv)
    if not options.configs:
        raise ConfigError("no --config given: name the training config to plan, e.g. "
                          "--config configs/training_config.yaml")
    config = parse_fit_config(fit_args)
    free_bytes, free_source = card_free_memory(options.vram_bytes)
    capability, capability_source = card_capability(options.capability)
    model, data = config.model, config.data
    model_config, config_path = load_model_config(model.name_or_path, data.tiny_vocab_size, data.seq_len)
    from codetune.model.loading import check_context

    check_context(data.seq_len, model_config)
    try:
        shape = ModelShape.from_config(model_config)
    except (AttributeError, TypeError) as err:
        raise ConfigError(f"--model.name_or_path {model.name_or_path!r}: {config_path} is not a decoder the plan "
                          f"knows (Llama/Qwen2-style): {err}.") from err
    report = plan_report(shape, model, data, free_bytes, capability)
    report.update(model=model.name_or_path, model_config=str(config_path), model_shape=asdict(shape),
                  configs=list(options.configs), free_source=free_source, capability_source=capability_source)
    print(json.dumps(_json_ready(report), indent=2) if options.json else format_report(report))
    return 0


def split_plan_flags(argv: Sequence[str]) -> tuple[PlanOptions, list[str]]:
    """(the command's own flags, the rest for fit's parser). `--vram` takes `6GiB` or `--vram=6GiB`."""
    vram, capability, as_json, rest, configs = None, None, False, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--json":
            as_json = True
        elif arg == "--vram" or arg.startswith("--vram="):
            vram = parse_size(_flag_value(arg, args))
        elif arg == "--capability" or arg.startswith("--capability="):
            capability = parse_capability(_flag_value(arg, args))
        else:
            if arg == "--config" and args:
                configs.append(args[0])
            elif arg.startswith("--config="):
                configs.append(arg.partition("=")[2])
            rest.append(arg)
    return PlanOptions(vram, as_json, tuple(configs), capability), rest


def _flag_value(arg: str, rest: list[str]) -> str:
    """The value of `--flag=value`, or of `--flag value` (taken from `rest`)."""
    return arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")


def parse_size(text: str) -> int:
    """Bytes of a size like ``6GiB``, ``5.5 GiB``, ``6144MiB`` or ``8GB`` (GB and MB are powers of ten)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"--vram {text!r}: give the card's free memory with a unit, e.g. --vram 6GiB, 6144MiB "
                          f"or 8GB (GiB/MiB are powers of two, GB/MB of ten).")
    size = float(match["number"]) * _UNITS[match["unit"].lower()]
    if size <= 0:
        raise ConfigError(f"--vram {text!r}: must be more than 0.")
    return int(size)


def parse_fit_config(fit_args: list[str]) -> Any:
    """`fit`'s configuration for these flags (configs merged, links applied, defaults from the real
    signatures), without instantiating anything. A bad flag or value is a ConfigError."""
    from codetune.cli import CodetuneCLI, resolve_config_args
    from codetune.data.datamodule import CodeDataModule
    from codetune.model.module import CodeLoRAModule

    class _ParseOnly(CodetuneCLI):
        def before_instantiate_classes(self) -> None:
            pass  # no run directory: nothing is trained

        def instantiate_classes(self) -> None:
            pass  # no model, data module or trainer: the plan needs only their settings

    # Last, so it overrides the configs: planning must not reseed this process's generators.
    args = [*resolve_config_args(fit_args), "--seed_everything=false"]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _ParseOnly(CodeLoRAModule, CodeDataModule, args=args, run=False, auto_configure_optimizers=False,
                             parser_kwargs={"prog": "codetune plan"})
    except ConfigError as err:  # a flag or config key the parser does not know, or a bad value
        raise ConfigError(f"{err} `codetune plan` takes fit's --config, --model.* and --data.* flags, plus "
                          f"--vram SIZE and --json (see `codetune fit --help`).") from None
    return cli.config


def card_free_memory(vram_bytes: int | None) -> tuple[int, str]:
    """(free bytes of the card before loading, where the figure comes from)."""
    if vram_bytes is not None:
        return vram_bytes, "--vram"
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("no CUDA card here to read the free memory from: give it with --vram, e.g. --vram 6GiB.")
    free, _ = torch.cuda.mem_get_info(0)
    # Asking created this process's CUDA context, which the plan counts already (cuda_context).
    return free + CUDA_CONTEXT_BYTES, f"cuda:0 ({torch.cuda.get_device_name(0)})"


def card_capability(capability: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    """(the compute capability to plan for, where it comes from): --capability, the card present, or Turing's."""
    if capability is not None:
        return capability, "--capability"
    import torch

    if torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability(0)), f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return ASSUMED_CAPABILITY, "assumed: no card here and no --capability (7.5 is the smallest card planned for)"


def load_model_config(name_or_path: str, tiny_vocab_size: int, seq_len: int) -> tuple[Any, str]:
    """(the transformers config of the model, where it was read), from `config.json` only."""
    from transformers import AutoConfig

    from codetune.data.tokenizer import TINY_NAME
    from codetune.model.tiny import rounded_vocab_size, tiny_config

    if name_or_path == TINY_NAME:
        # The tiny model's vocabulary is its tokenizer's, trained at fit time: at most --data.tiny_vocab_size.
        vocab = rounded_vocab_size(tiny_vocab_size)
        return tiny_config(vocab, max_position_embeddings=max(seq_len, 4096)), "the embedded tiny model"
    path = model_config_file(name_or_path)
    try:
        return AutoConfig.from_pretrained(str(path.parent)), str(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--model.name_or_path {name_or_path!r}: {path} does not describe a model transformers "
                          f"knows ({' '.join(str(err).split())[:300]}).") from err


def model_config_file(name_or_path: str) -> Path:
    """`config.json` of a local model directory, or of a hub id already in the Hugging Face cache."""
    local = local_model_dir(name_or_path)
    if local is not None:
        if (local / "config.json").is_file():
            return local / "config.json"
        raise ConfigError(f"--model.name_or_path {name_or_path!r}: the directory has no config.json. Point it at "
                          f"a model directory (e.g. bench/models/qwen2.5-coder-1.5b).")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError:
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    raise ConfigError(f"--model.name_or_path {name_or_path!r}: no such directory, and no config.json for it in the "
                      f"Hugging Face cache (`codetune plan` downloads nothing). Fetch it once with `hf download "
                      f"{name_or_path} config.json`, or point --model.name_or_path at a directory holding the "
                      f"model's config.json, e.g. bench/models/qwen2.5-coder-1.5b.")


def plan_report(shape: ModelShape, model: Any, data: Any, free_bytes: int,
                capability: tuple[int, int] = ASSUMED_CAPABILITY) -> dict[str, Any]:
    """The plan `fit` would make on a CUDA card of compute `capability` with `free_bytes` free, and the choices
    behind it: the dtype and precision it trains in, the attention kernels, checkpointing, the micro-batch.

    `model` / `data` hold the `--model.*` / `--data.*` settings (fit's parsed namespaces).
    """
    from codetune.data.arguments import check_batch
    from codetune.model.kernels import attention_plan
    from codetune.model.loading import precision_for, resolve_dtype, resolve_quantization
    from codetune.model.optim import resolve_optimizer

    # The data module checks these in __init__, which the plan does not run.
    check_batch(data.batch_size, data.gradient_accumulation_steps, data.effective_batch_size)
    quantized = resolve_quantization(model.quantization, cuda_available=True)
    dtype = resolve_dtype(model.dtype, "cuda", capability)
    dtype_name = str(dtype).removeprefix("torch.")
    attention = attention_plan(model.attn_implementation, capability, dtype_name, shape.num_attention_heads,
                               shape.num_key_value_heads, shape.head_size, data.packing)
    effective = data.effective_batch_size if data.batch_size == "auto" else (
        data.batch_size * data.gradient_accumulation_steps)
    checkpointing = model.gradient_checkpointing
    base = training_shape_for(
        seq_len=data.seq_len, micro_batch_size=1 if data.batch_size == "auto" else data.batch_size,
        quantized_4bit=quantized, compute_dtype_bytes=dtype.itemsize,
        lora_rank=model.lora_rank, lora_target_modules=model.lora_target_modules, lora_dropout=model.lora_dropout,
        modules_to_save=model.modules_to_save, optimizer=resolve_optimizer(model.optimizer, quantized, True),
        gradient_checkpointing=checkpointing is True, loss_chunk_size=model.loss_chunk_size,
        attn_implementation=model.attn_implementation, packing=data.packing, device="cuda",
        unmasked_kernel=attention.unmasked)
    auto = checkpointing == "auto"
    largest = largest_fitting(effective, free_bytes, shape, base, auto)
    plan = plan_for_card(shape, base, free_bytes, auto, effective if data.batch_size == "auto" else None)
    micro = plan.training.micro_batch_size
    without = plan_memory(shape, replace(base, micro_batch_size=micro, gradient_checkpointing=False))
    return {
        "capability": f"{capability[0]}.{capability[1]}", "dtype": dtype_name, "precision": precision_for(dtype),
        "float16_residual_scale": model.float16_residual_scale if dtype_name == "float16" else None,
        "attention_kernel": attention.kernel, "attention": attention.record(),
        "micro_batch_size": micro, "gradient_accumulation_steps": effective // micro,
        "effective_batch_size": effective, "batch_size_setting": data.batch_size,
        "gradient_checkpointing": plan.training.gradient_checkpointing,
        "gradient_checkpointing_setting": checkpointing,
        "without_checkpointing_bytes": without.required_free_bytes(),
        "free_bytes": free_bytes, "fits": plan.fits(free_bytes),
        "predicted_peak_bytes": plan.total, "required_free_bytes": plan.required_free_bytes(),
        "allocator_margin": ALLOCATOR_MARGIN, "terms_bytes": plan.terms(),
        "largest_fitting": None if largest is None else _choice_summary(largest),
        "training": asdict(plan.training), "plan": plan,
    }


def _choice_summary(choice: MicroBatchChoice) -> dict[str, Any]:
    return {"micro_batch_size": choice.micro_batch_size,
            "gradient_accumulation_steps": choice.gradient_accumulation_steps,
            "gradient_checkpointing": choice.plan.training.gradient_checkpointing,
            "predicted_peak_bytes": choice.plan.total, "required_free_bytes": choice.plan.required_free_bytes()}


def format_report(report: dict[str, Any]) -> str:
    """The console answer: where the figures come from, the plan term by term, and the two decisions."""
    plan: MemoryPlan = report["plan"]
    setting = report["gradient_checkpointing_setting"]
    on = "on" if report["gradient_checkpointing"] else "off"
    if setting == "auto":
        why = f"auto: without it the step needs {gib(report['without_checkpointing_bytes'])} GiB"
    else:
        why = f"--model.gradient_checkpointing {str(setting).lower()}"
    scaled = (f", residual stream scaled by 1/{report['float16_residual_scale']}"
              if report["float16_residual_scale"] and report["float16_residual_scale"] > 1 else "")
    lines = [f"codetune plan: {report['model']} ({report['model_config']}); {', '.join(report['configs'])}",
             f"card: {gib(report['free_bytes'])} GiB free ({report['free_source']}), compute capability "
             f"{report['capability']} ({report['capability_source']})",
             f"trains in {report['dtype']} ({report['precision']}{scaled})",
             f"attention: {report['attention']['description']}",
             format_plan(plan, report["free_bytes"]),
             f"gradient checkpointing: {on} ({why})"]
    largest = report["largest_fitting"]
    if largest is None:
        fix = ("turn on --model.gradient_checkpointing (true or auto)" if setting is False
               else "shorten --data.seq_len or lower --model.lora_rank")
        lines.append(f"largest micro-batch that fits: none, not even 1 (effective batch "
                     f"{report['effective_batch_size']}): {fix}")
    else:
        lines.append(f"largest micro-batch that fits: {largest['micro_batch_size']} x "
                     f"{largest['gradient_accumulation_steps']} accumulation (checkpointing "
                     f"{'on' if largest['gradient_checkpointing'] else 'off'}, needs "
                     f"{gib(largest['required_free_bytes'])} GiB); `--data.batch_size auto "
                     f"--data.effective_batch_size {report['effective_batch_size']}` picks it")
    return "\n".join(lines)


def _json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """The report for --json: bytes as integers plus GiB, without the plan object."""
    out = {k: v for k, v in report.items() if k != "plan"}
    out["terms_gib"] = {k: gib_figure(v) for k, v in report["terms_bytes"].items()}
    for key in ("free_bytes", "predicted_peak_bytes", "required_free_bytes", "without_checkpointing_bytes"):
        out[key.replace("_bytes", "_gib")] = gib_figure(report[key])
    return out
