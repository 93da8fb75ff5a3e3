"""Using a finished run: `codetune generate RUN --prompt ...` and `codetune merge RUN --out DIR`.

Both rebuild the base model from the run's `config.yaml` (`model.name_or_path`: a hub id, a local
directory, or `tiny`, whose randomly initialised base and tokenizer the run saved in `base_model/`)
and apply the LoRA adapter in `adapter/` with peft, exactly as `PeftModel.from_pretrained` would.
The adapter is checked first: one NaN or inf in it and nothing is generated or written. So is the
base, against what the run's MANIFEST.json recorded (`phase_3_model.base_revision`, see
`codetune/model/revision.py`): a hub id is loaded at the commit the run trained on, not at whatever
its branch points to now; a local directory (or `base_model/`) that changed since is refused.

**generate** loads the base as training did: `model.quantization` and `model.dtype` are resolved
for the device at hand (`auto`: 4-bit NF4 and bf16 on CUDA, unquantized fp32 on CPU). Each prompt
is tokenized like the training files (no special tokens) and completed on its own, greedily unless
`--do_sample`; sampling is reseeded per prompt, so a completion does not depend on the others.
Settings not given here (repetition penalty, top-k...) come from the model's generation config, as
for the samples written during training.

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
`codetune_merge.json` (source run, base, dtype): a later merge may replace it, but any other
non-empty directory is refused.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from callbacks.manifest import ADAPTER_DIR
from codetune.cli import CONFIG_NAME
from codetune.data.tokens import load_tokenizer, pad_token_id
from codetune.errors import ConfigError, NonFiniteWeightsError
from codetune.model.loading import load_causal_lm, resolve_dtype, resolve_quantization
from codetune.model.module import BASE_MODEL_DIR
from codetune.model.revision import LOCAL, check_same_base, local_fingerprint, pinned_revision
from codetune.model.tiny import TINY_NAME
from codetune.run import MANIFEST_NAME, MERGE_MARKER, atomic_save_dir, replaceable_output_dir, utc_now

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """What `generate` and `merge` take from a finished run directory."""

    run_dir: Path
    name_or_path: str
    """model.name_or_path: hub id, local directory or 'tiny'."""
    quantization: str
    """model.quantization: 'auto', 'nf4' or 'none'."""
    dtype: str
    """model.dtype: 'auto', 'bfloat16', 'float16' or 'float32'."""
    trust_remote_code: bool
    attn_implementation: str
    max_new_tokens: int | None = None
    """generation.max_new_tokens: the default of `generate --max_new_tokens`; likewise the three below."""
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    base_revision: dict[str, Any] | None = None
    """MANIFEST.json's phase_3_model.base_revision: what the base was when the run trained (None: not recorded)."""

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @property
    def base_source(self) -> str:
        """Where the base loads from: the run's base_model/ for 'tiny', the hub id or directory otherwise."""
        return str(self.run_dir / BASE_MODEL_DIR) if self.name_or_path == TINY_NAME else self.name_or_path


def load_run_config(run: str | Path) -> RunConfig:
    """The model settings of run directory `run`; a missing or unfinished run is a ConfigError saying what to do."""
    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise ConfigError(f"RUN {str(run)!r} {what}. Give a run directory, e.g. runs/<name> (the last line "
                          f"`codetune fit` prints).")
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise ConfigError(f"RUN {str(run)!r} has no {CONFIG_NAME}: it is not a codetune run directory. Give the "
                          f"directory that `codetune fit` printed, e.g. runs/<name>.")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    model = config.get("model") or {}
    missing = [f"model.{k}" for k in ("name_or_path", "quantization", "dtype", "trust_remote_code",
                                      "attn_implementation") if k not in model]
    if missing:
        raise ConfigError(f"RUN {str(run)!r}: {config_path} lacks {missing}; it was not written by `codetune fit`.")
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ConfigError(f"RUN {str(run)!r} has no {ADAPTER_DIR}/: the run did not finish. Resume it with "
                          f"`make resume RUN={run_dir}` or `codetune fit --config {config_path} --ckpt_path last` "
                          f"(if it never saved a checkpoint: `codetune fit --config {config_path}`).")
    if model["name_or_path"] == TINY_NAME and not (run_dir / BASE_MODEL_DIR / "config.json").is_file():
        raise ConfigError(f"RUN {str(run)!r} trained the 'tiny' model but its {BASE_MODEL_DIR}/ is missing, and "
                          f"the adapter only fits that base. Train the run again.")
    generation = config.get("generation") or {}
    return RunConfig(run_dir=run_dir, name_or_path=str(model["name_or_path"]), quantization=model["quantization"],
                     dtype=model["dtype"], trust_remote_code=bool(model["trust_remote_code"]),
                     attn_implementation=model["attn_implementation"],
                     **{k: generation.get(k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
                     base_revision=_phase_3_model(run_dir).get("base_revision"))


def check_base(config: RunConfig) -> None:
    """Refuse a local base that changed since the run trained: the adapter fits only the recorded one. (A hub base
    needs no check: it loads at its recorded commit.) A run without a record is loaded as is, with a warning."""
    recorded = config.base_revision
    if recorded is None:
        rank_zero_warn(f"codetune: {config.run_dir / MANIFEST_NAME} records no base revision (the run predates it), "
                       f"so the base {config.name_or_path!r} is loaded as it is now, unchecked; if it changed since "
                       f"training, the adapter does not fit it.")
        return
    if recorded.get("kind") != LOCAL:
        return
    base = Path(config.base_source)
    restore = (f"restore {base} as it was when the run trained (or train a new run on the changed base)"
               if config.name_or_path != TINY_NAME else
               f"restore the run's {BASE_MODEL_DIR}/ as `codetune fit` saved it (or train the run again)")
    if not base.is_dir():
        raise ConfigError(f"the run trained on the local base {base}, which is no longer a directory: {restore}.")
    check_same_base(recorded, local_fingerprint(base), flag_hint=restore)


def check_adapter_finite(adapter_dir: Path) -> None:
    """Refuse an adapter with a NaN or inf weight (a diverged run): its outputs would be garbage."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the adapter was not saved in full. Resume or retrain the run.")
    bad = []
    with safe_open(str(path), framework="pt") as weights:
        for key in weights.keys():
            if not torch.isfinite(weights.get_tensor(key)).all():
                bad.append(key)
    if bad:
        raise NonFiniteWeightsError(f"{path}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}): the training "
                            f"diverged, so nothing was loaded or written. Retrain with a lower --model.learning_rate.")


def load_tuned_tokenizer(config: RunConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(config.base_source, (), config.trust_remote_code,
                          flag=f"{config.run_dir / CONFIG_NAME}: model.name_or_path", **_pinned(config))


def load_tuned_model(config: RunConfig, device: torch.device, dtype: torch.dtype, quantize: bool) -> PeftModel:
    """The run's base (4-bit NF4 when `quantize`) in `dtype` on `device`, with its adapter, in eval mode."""
    check_adapter_finite(config.adapter_dir)
    check_base(config)
    base = load_causal_lm(config.base_source, quantize, dtype, config.trust_remote_code,
                          config.attn_implementation, device, **_pinned(config))
    if not quantize:
        base = base.to(device)  # a 4-bit base is placed while loading
    model = PeftModel.from_pretrained(base, str(config.adapter_dir), is_trainable=False)
    return model.eval()


def training_precision(config: RunConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(4-bit?, compute dtype) that training used on a device of this type."""
    cuda = device.type == "cuda"
    return resolve_quantization(config.quantization, cuda), resolve_dtype(config.dtype, cuda)


@torch.no_grad()
def generate_completions(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                         prompts: Sequence[str], max_new_tokens: int, do_sample: bool = False,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The completion (new text only) of each prompt, one prompt at a time (no padding to perturb the numbers)."""
    device = next(model.parameters()).device
    completions = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        if do_sample:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, pad_token_id=pad_token_id(tokenizer), **sampling)
        completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


def _pinned(config: RunConfig) -> dict[str, str]:
    """`revision=<commit>` for a hub base recorded by the run; nothing for a directory (it has no revisions)."""
    commit = pinned_revision(config.base_revision)
    return {"revision": commit} if commit else {}


def merge_run(config: RunConfig, out: Path, dtype: str = "bfloat16") -> Path:
    """Merge the run's adapter into its unquantized base in `dtype` and save model + tokenizer to `out`."""
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
        marker = {"source_run": str(config.run_dir.resolve()), "base_model": config.name_or_path,
                  "base_revision": (config.base_revision or {}).get("revision"), "dtype": dtype, "merged_at": utc_now()}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def _check_finite(model: torch.nn.Module, dtype: str) -> None:
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(f"the merged weights hold NaN or inf in {dtype} (e.g. {bad[0]}): nothing was "
                            f"written. Use --dtype bfloat16 or float32 (float16 overflows above 65504).")


def trained_on_4bit(run_dir: Path) -> bool:
    """Whether the run's manifest says the base it trained against was 4-bit (False when unknown)."""
    return bool(_phase_3_model(run_dir).get("quantized_4bit"))


def _phase_3_model(run_dir: Path) -> dict[str, Any]:
    """The model phase of the run's manifest ({} without a manifest)."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("phase_results", {}).get("phase_3_model", {})


# -- commands ----------------------------------------------------------------------------------------


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetune generate",
        description="Complete code with a finished run: its base model (as training loaded it) plus its LoRA "
                    "adapter. Prints each prompt followed by its completion; several prompts are separated by a "
                    "blank line.")
    parser.add_argument("run", help="The run directory (runs/<name>, the last line `codetune fit` prints).")
    parser.add_argument("--prompt", action="append", required=True,
                        help="Code to complete, e.g. 'fn process'. Repeat for several prompts.")
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
                             "resolve for it as in training (auto: 4-bit NF4 + bf16 on CUDA, fp32 on CPU).")
    return parser


def main_generate(argv: Sequence[str]) -> int:
    args = build_generate_parser().parse_args(list(argv))
    device = _device(args.device)
    config = load_run_config(args.run)
    settings = _generation_settings(args, config)
    quantize, dtype = training_precision(config, device)
    model = load_tuned_model(config, device, dtype, quantize)
    tokenizer = load_tuned_tokenizer(config)
    completions = generate_completions(model, tokenizer, args.prompt, **settings)
    print("\n\n".join(p + c for p, c in zip(args.prompt, completions)), flush=True)
    return 0


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
    empty = [i + 1 for i, p in enumerate(args.prompt) if not p]
    if empty:
        problems.append(f"--prompt number {empty[0]} is empty: give the start of the code to complete")
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def _device(name: str) -> torch.device:
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
