"""A finished run directory, as the commands that use it read it: `generate`, `merge` and `export`.

`load_run_config` takes what they need from the run's `config.yaml` (the model, the generation defaults, the
repository) and MANIFEST.json (the base's recorded revision), and refuses, with the command to run, a
directory that is not a run or whose adapter was never written. `check_adapter_finite` refuses an adapter
holding NaN or inf; `check_base` a local base that changed since the run trained on it.

Only the standard library, PyYAML and codetune's own light modules are imported here (torch and safetensors
when an adapter is read), so that `codetune export` starts in a second or two, not the seven that Lightning,
peft and transformers take.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from codetune.errors import ConfigError, NonFiniteWeightsError
from codetune.model.revision import LOCAL, check_same_base, local_fingerprint, pinned_revision
from codetune.data.model_source import model_location
from codetune.data.tokenizer import TINY_NAME
from codetune.storage import ADAPTER_DIR, BASE_MODEL_DIR, CONFIG_NAME, MANIFEST_NAME
from codetune.run.manifest import resume_command
from codetune.run.directory import live_status, read_holder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class RunConfig:
    """What `generate`, `merge` and `export` take from a finished run directory."""

    run_dir: Path
    name_or_path: str
    """model.name_or_path: hub id, local directory, 'embedded' or 'tiny'."""
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
    repo: str | None = None
    """data.repo: the repository the run trained on, as given to `codetune fit`."""
    file_headers: bool = False
    """data.file_headers: training files began with `<|file_sep|>path` (False in runs that predate the flag)."""
    float16_residual_scale: int = 32
    """model.float16_residual_scale: in float16 the residual stream runs scaled by 1/N, as in training (32 in runs
    that predate the flag: the default since it exists; the scaling changes no logit, only the range)."""

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @property
    def base_source(self) -> str:
        """Where the base loads from: the run's base_model/ for 'tiny', the package's directory for 'embedded', the
        hub id or directory otherwise."""
        return str(self.run_dir / BASE_MODEL_DIR) if self.name_or_path == TINY_NAME else \
            model_location(self.name_or_path)


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
        raise ConfigError(f"RUN {str(run)!r} has no {ADAPTER_DIR}/: {unfinished(run_dir)}")
    if model["name_or_path"] == TINY_NAME and not (run_dir / BASE_MODEL_DIR / "config.json").is_file():
        raise ConfigError(f"RUN {str(run)!r} trained the 'tiny' model but its {BASE_MODEL_DIR}/ is missing, and "
                          f"the adapter only fits that base. Train the run again.")
    generation = config.get("generation") or {}
    data = config.get("data") or {}
    return RunConfig(run_dir=run_dir, name_or_path=str(model["name_or_path"]), quantization=model["quantization"],
                     dtype=model["dtype"], trust_remote_code=bool(model["trust_remote_code"]),
                     attn_implementation=model["attn_implementation"],
                     **{k: generation.get(k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
                     base_revision=phase_3_model(run_dir).get("base_revision"),
                     repo=data.get("repo"), file_headers=bool(data.get("file_headers", False)),
                     float16_residual_scale=int(model.get("float16_residual_scale", 32)))


def unfinished(run_dir: Path) -> str:
    """Why a run has no adapter yet, and what to do: it is training now, was killed, or stopped."""
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text(encoding="utf-8")) if (
        run_dir / MANIFEST_NAME).is_file() else {}
    status = live_status(run_dir, manifest)
    if status == "running":
        holder = read_holder(run_dir)
        return (f"it is still training (process {holder.get('pid')} on {holder.get('host')}). Wait for it to "
                f"finish.")
    resume = resume_command(run_dir)
    if status == "killed":
        return (f"it was killed while training (its manifest still says running, and no process holds it). "
                f"Resume it with: {resume}")
    if status == "completed":
        return f"it was removed after the run completed. Write it again from the last checkpoint with: {resume}"
    said = f" (its manifest says {status})" if manifest else ""
    return f"the run did not finish. Resume it with: {resume} (or: make resume RUN={run_dir}){said}"


def check_base(config: RunConfig) -> None:
    """Refuse a local base that changed since the run trained: the adapter fits only the recorded one. (A hub base
    needs no check: it loads at its recorded commit.) A run without a record is loaded as is, with a warning."""
    recorded = config.base_revision
    if recorded is None:
        warnings.warn(f"codetune: {config.run_dir / MANIFEST_NAME} records no base revision (the run predates it), "
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
    import torch
    from safetensors import safe_open

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
    """The run's tokenizer: its base's, at the recorded commit ('tiny': the one the run saved in base_model/)."""
    from codetune.data.tokens import load_tokenizer

    return load_tokenizer(config.base_source, (), config.trust_remote_code,
                          flag=f"{config.run_dir / CONFIG_NAME}: model.name_or_path", **pinned(config))


def pinned(config: RunConfig) -> dict[str, str]:
    """`revision=<commit>` for a hub base recorded by the run; nothing for a directory (it has no revisions)."""
    commit = pinned_revision(config.base_revision)
    return {"revision": commit} if commit else {}


def trained_on_4bit(run_dir: Path) -> bool:
    """Whether the run's manifest says the base it trained against was 4-bit (False when unknown)."""
    return bool(phase_3_model(run_dir).get("quantized_4bit"))


def phase_3_model(run_dir: Path) -> dict[str, Any]:
    """The model phase of the run's manifest ({} without a manifest)."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("phase_results", {}).get("phase_3_model", {})
