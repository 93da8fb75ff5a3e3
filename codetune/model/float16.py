"""Float16 training of Llama/Qwen2-shaped decoders without overflow in the residual stream.

Turing cards (RTX 20xx, compute capability 7.5) have no native bf16, so codetune trains there in float16 under
autocast. Qwen2-family models were trained in bf16 (fp32's exponent range), and a few channels of their residual
stream carry "massive activations" of 1e4-1e5 on some tokens: past float16's largest value, 65504, the stream
becomes inf and the next norm NaN.

The fix runs the residual stream scaled by 1/c (c a power of two, 32 by default), so it has c times more headroom.
Every tensor added into the stream is scaled where it is made: the token embeddings; each attention's values
(attention is linear in V, and o_proj has no bias, so the attention output is scaled); each MLP's up projection
(act(gate) * up/c, then down_proj, no bias). RMSNorm is scale invariant once its epsilon is scaled too,
RMSNorm(x/c, eps/c**2) == RMSNorm(x, eps), so every norm that reads the stream (each layer's two and the final
one) gets eps/c**2 and returns what it returned before: the final hidden states and the logits are unchanged.
Qwen3's q_norm/k_norm read q and k, not the stream, and keep their epsilon.

Nothing is saved for backward: each scaling is an in-place multiplication by a Python scalar in a forward hook,
which autograd records without saving a tensor (the tests compare the bytes autograd saves), and a checkpointed
layer's recompute runs the hooks again. The hooks sit on the outermost module at each path (`self_attn.v_proj`,
`mlp.up_proj`, `embed_tokens`), so a peft LoRA wrapper's output, base and adapter delta, is scaled as a whole,
with or without `disable_adapter()`, whatever the base layer is (`nn.Linear`, bitsandbytes' `Linear4bit`).

Trade-offs:
- Why not clamp the stream (as transformers does for T5 in float16)? Clamping saturates the massive channel: the
  token stays finite, but its RMS, and so the normalised value of every other channel, is wrong (by 3x for a
  2e5 channel clamped to 64504; the tests measure it). Scaling changes no number in real arithmetic.
- Why a power of two: multiplying by one only changes the exponent, so it is exact in floating point; in fp32
  the scaled model computes the same numbers as the unscaled one.
- The subnormal threshold moves up by c: true values below 6.1e-5 * c (2e-3 at c=32) become float16 subnormals,
  whose absolute spacing is 6e-8 * c (2e-6 at c=32) in true units. That is far below the rounding of a
  component of typical size (about 1: 4.9e-4), which is what the next RMSNorm divides by.
- Backward: the gradients of the stream (and of the attention and MLP outputs) are c times larger, parameter
  gradients are unchanged. A GradScaler settles at a c times smaller loss scale: up to log2(c) more skipped
  steps at the start of a run.
- Only where it is exact: a model of another shape (no `embed_tokens`, no `v_proj`/`up_proj`, a bias on
  `o_proj`/`down_proj`, norms without `variance_epsilon`, extra norms on the branches) is refused. The stream
  is scaled at `embed_tokens`, so a forward given `inputs_embeds` instead of `input_ids` bypasses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.hooks import RemovableHandle

from codetune.errors import ConfigError

SCALE_FLAG = "--model.float16_residual_scale"
DEFAULT_RESIDUAL_SCALE = 32
SCALED_OUTPUTS = ("self_attn.v_proj", "mlp.up_proj")  # the stream's sources in each layer (with embed_tokens)
BIAS_FREE = ("self_attn.o_proj", "mlp.down_proj")  # their output must follow their input's scale
STREAM_NORMS = ("input_layernorm", "post_attention_layernorm")
_SCALED_MARK = "_codetune_residual_scale"


@dataclass
class ResidualScaling:
    """What `scale_residual_stream` did to a model; `remove()` undoes it (hooks and epsilons)."""

    scale: int
    handles: list[RemovableHandle] = field(default_factory=list)
    epsilons: list[tuple[torch.nn.Module, float]] = field(default_factory=list)
    decoder: torch.nn.Module | None = None

    @property
    def hooks(self) -> int:
        return len(self.handles)

    def manifest(self) -> dict[str, int]:
        return residual_scaling_manifest(self.scale, self.hooks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for norm, epsilon in self.epsilons:
            norm.variance_epsilon = epsilon
        if self.decoder is not None and hasattr(self.decoder, _SCALED_MARK):
            delattr(self.decoder, _SCALED_MARK)
        self.handles, self.epsilons, self.decoder = [], [], None


def residual_scaling_manifest(scale: int, hooks: int) -> dict[str, int]:
    """The run manifest's record of the scaling: its factor (1: off) and how many outputs it scales."""
    return {"residual_scale": scale, "hooks": hooks}


def check_residual_scale(scale: int) -> None:
    """A scale must be a power of two >= 1 (exact in floating point); 1 turns scaling off."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1 or scale & (scale - 1):
        raise ConfigError(f"{SCALE_FLAG} {scale!r}: use a power of two, e.g. {DEFAULT_RESIDUAL_SCALE} (the "
                          f"default) or 1 (off); only a power of two scales float16 numbers exactly.")


def scale_residual_stream(model: torch.nn.Module, scale: int) -> ResidualScaling:
    """Run `model`'s residual stream divided by `scale` (see the module docstring); the outputs do not change.

    A model of another shape than Llama/Qwen2's is one ConfigError listing what does not fit; scale 1 does nothing.
    """
    check_residual_scale(scale)
    if scale == 1:
        return ResidualScaling(scale)
    problems = residual_scaling_problems(model)
    if problems:
        raise ConfigError(f"{SCALE_FLAG} {scale} scales the residual stream of Llama/Qwen2-shaped decoders only, "
                          f"and this model has {'; '.join(problems)}. Use {SCALE_FLAG} 1 (off) for this model, or "
                          f"train in bfloat16/float32 (--model.dtype).")
    _, decoder = _find_decoder(model)
    if hasattr(decoder, _SCALED_MARK):
        raise RuntimeError(f"the residual stream is already scaled by {getattr(decoder, _SCALED_MARK)}: remove() "
                           f"that scaling first")
    setattr(decoder, _SCALED_MARK, scale)
    scaling = ResidualScaling(scale, decoder=decoder)
    # Prepended, so the embedding is scaled before `enable_input_require_grads` makes its output a leaf that
    # requires grad (an in-place change of such a leaf is an error).
    hook = partial(_scale_output, 1.0 / scale)
    scaling.handles = [source.register_forward_hook(hook, prepend=True) for source in _stream_sources(decoder)]
    for norm in _stream_norms(decoder):
        scaling.epsilons.append((norm, norm.variance_epsilon))
        norm.variance_epsilon = norm.variance_epsilon / scale**2  # exact: a power of two
    return scaling


def _scale_output(factor: float, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
    # In place and by a Python scalar: autograd saves nothing for it, and the output's buffer is reused.
    output.mul_(factor)


def _stream_sources(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    layers = decoder.layers
    return [decoder.embed_tokens, *(layer.get_submodule(path) for layer in layers for path in SCALED_OUTPUTS)]


def _stream_norms(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    norms = [decoder.norm, *(layer.get_submodule(path) for layer in decoder.layers for path in STREAM_NORMS)]
    return [holder for norm in norms for holder in _epsilon_holders(norm)]


def _epsilon_holders(module: torch.nn.Module) -> list[torch.nn.Module]:
    # The norm itself, or the copies inside a peft ModulesToSaveWrapper (whose __getattr__ would forward).
    return [m for m in module.modules() if "variance_epsilon" in vars(m)]


def residual_scaling_problems(model: torch.nn.Module) -> list[str]:
    """Why scaling the residual stream of `model` would not be exact; empty when it fits."""
    found = _find_decoder(model)
    if found is None:
        return ["no decoder with embed_tokens, layers and norm"]
    _, decoder = found
    layer_indices: dict[str, list[int]] = {}
    for index, layer in enumerate(decoder.layers):
        for problem in _layer_problems(layer):
            layer_indices.setdefault(problem, []).append(index)
    count = len(decoder.layers)
    problems = [f"{problem} in {len(indices)} of {count} layers (from layer {indices[0]})"
                for problem, indices in layer_indices.items()]
    if not _epsilon_holders(decoder.norm):
        problems.append("a final norm without variance_epsilon")
    return problems


def _layer_problems(layer: torch.nn.Module) -> list[str]:
    parts = {path: _submodule(layer, path) for path in (*SCALED_OUTPUTS, *BIAS_FREE, *STREAM_NORMS)}
    problems = [f"no {path}" for path, module in parts.items() if module is None]
    problems += [f"a bias on {path}" for path in BIAS_FREE if parts[path] is not None and _has_bias(parts[path])]
    problems += [f"a norm {path} without variance_epsilon" for path in STREAM_NORMS
                 if parts[path] is not None and not _epsilon_holders(parts[path])]
    # A norm on a branch's output (Gemma2's, OLMo2's) would undo that branch's scaling.
    problems += [f"another norm, {name}" for name, _ in layer.named_children()
                 if "norm" in name and name not in STREAM_NORMS]
    return problems


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _has_bias(module: torch.nn.Module) -> bool:
    # Every linear inside: a LoRA wrapper's base layer and its lora_B (peft's lora_bias).
    return any(isinstance(getattr(m, "bias", None), torch.Tensor) for m in module.modules())


def _find_decoder(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The decoder (qualified name, module): the first module with `embed_tokens`, `layers` and `norm`."""
    for name, module in model.named_modules():
        has_parts = all(isinstance(getattr(module, part, None), torch.nn.Module) for part in ("embed_tokens", "norm"))
        if has_parts and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return name, module
    return None


def first_non_finite_layer(model: torch.nn.Module, run_forward: Callable[[], object]) -> str | None:
    """The qualified name of the first module, the embedding or a decoder layer, whose output held inf or NaN
    while `run_forward()` ran (its forward pass); None when all were finite. Its hooks are removed afterwards."""
    found = _find_decoder(model)
    if found is None:
        raise ValueError("no decoder with embed_tokens, layers and norm to watch")
    prefix, decoder = found
    watched = [("embed_tokens", decoder.embed_tokens), *((f"layers.{i}", m) for i, m in enumerate(decoder.layers))]
    first: list[str] = []
    handles = [module.register_forward_hook(partial(_note_non_finite, first, f"{prefix}.{name}".lstrip(".")))
               for name, module in watched]
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


def _note_non_finite(first: list[str], name: str, module: torch.nn.Module, args: tuple, output: object) -> None:
    tensor = output[0] if isinstance(output, tuple) else output
    if not first and isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
        first.append(name)
