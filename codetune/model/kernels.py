"""Which attention kernel runs each micro-batch on a CUDA card: chosen by codetune, never torch's fallback.

torch's `scaled_dot_product_attention` (SDPA) takes, for each call, the first of its CUDA kernels whose
constraints the call meets (flash, then memory-efficient; cuDNN first on Hopper and Blackwell with a recent
cuDNN) and falls back to the *math* kernel when none does. Math materialises the scores, their softmax and,
in training, their gradients as ``[b, heads, s, s]`` fp32 tensors: 3 GiB each at 4 x 4096 tokens with the
12 heads of Qwen2.5-Coder-1.5B, an out-of-memory on a 6 GiB card that the memory plan, which assumes a
fused kernel, cannot see coming.

The constraints that decide it for codetune's models, as torch 2.13's dispatcher states them
(``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``; `unsupported_reason` encodes them):

- **flash**: compute capability 8.0 to 12.1, fp16 or bf16, no attention mask, head size at most 256 (on
  8.6-8.9 and 12.x at most 192 for training). It takes grouped-query attention as it is (`enable_gqa`: key
  and value keep their own heads, 2 for the 12 query heads of Qwen2.5-1.5B).
- **memory-efficient** (``efficient``): compute capability 5.0 to 12.1, fp16 or fp32 (bf16 from 8.0), a
  mask as an additive bias, head size a multiple of the tensor-core alignment. It does not take
  grouped-query attention: key and value must be repeated to the query heads.

transformers' `sdpa` attention passes ``enable_gqa=True`` whenever a micro-batch has no mask, which only
flash can run: on Turing (7.5, no flash kernel) and in fp32 on any card those micro-batches fell to math.
codetune's attention (`codetune.model.attention`) chooses instead, per micro-batch:

- **without a file boundary in any window** (no mask): flash where the card and dtype allow it (key and
  value as they are), else memory-efficient with key and value repeated (`KernelChoice.repeat_kv`);
- **with one** (packed windows restart their position ids at each file, and transformers turns that into a
  block-diagonal boolean mask): memory-efficient with the mask as a ``[b, 1, s, s]`` bias, key and value
  repeated.

It runs SDPA with only that kernel enabled, so a call that kernel cannot take is an error, never math.
bf16 below 8.0 has no fused kernel at all and is refused up front (`auto` trains in fp16 there).
`attention_plan` names the kernels of a run for the memory plan, `codetune plan` and the manifest;
`torch_choice` replays torch's own pick (for tests and the GPU check that emulate a card).

Pure: no torch import (`codetune plan` and the memory plan use it before anything is loaded).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from codetune.errors import ConfigError

Kernel = Literal["flash", "efficient", "math"]
# torch's order of preference among the kernels codetune's calls can meet (cuDNN, first on sm90/sm100 with
# cuDNN >= 9.15, takes no call here that flash or memory-efficient would not; it never decides against math).
TORCH_PRIORITY: tuple[Kernel, ...] = ("flash", "efficient", "math")
DTYPES = ("float16", "bfloat16", "float32")
FLASH_RANGE = ((8, 0), (12, 1))
EFFICIENT_RANGE = ((5, 0), (12, 1))
NATIVE_BF16 = (8, 0)
FLASH_MAX_HEAD = 256
# Flash's backward on sm86-sm89 and sm120-sm121 takes head sizes up to 192 only.
FLASH_MAX_HEAD_TRAINING_CONSUMER = 192
KERNEL_LABELS = {"flash": "flash", "efficient": "memory-efficient", "math": "math ([b, heads, s, s] fp32 scores)"}


@dataclass(frozen=True)
class SdpaCall:
    """What decides which SDPA kernels can run one call."""

    dtype: str
    """The inputs' dtype: 'float16', 'bfloat16' or 'float32'."""
    masked: bool
    """An attention mask is passed (a micro-batch holding a file boundary)."""
    query_heads: int
    kv_heads: int
    """Key/value heads as passed (the query's count once they were repeated)."""
    head_dim: int
    enable_gqa: bool = False
    """`enable_gqa=True` is passed (grouped-query attention without repeating key and value)."""

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.query_heads


@dataclass(frozen=True)
class KernelChoice:
    """The one kernel enabled for a call, and whether key and value are repeated to the query heads first."""

    kernel: Kernel
    repeat_kv: bool


def unsupported_reason(kernel: Kernel, capability: tuple[int, int], call: SdpaCall) -> str | None:
    """Why torch 2.13's `kernel` cannot run `call` on a CUDA card of `capability`, or None if it can."""
    if kernel == "math":
        return None
    if call.grouped and not call.enable_gqa:
        return "key/value heads differ from the query heads without enable_gqa"
    if kernel == "flash":
        return _flash_reason(tuple(capability), call)
    return _efficient_reason(tuple(capability), call)


def _flash_reason(capability: tuple[int, int], call: SdpaCall) -> str | None:
    if not FLASH_RANGE[0] <= capability <= FLASH_RANGE[1]:
        return f"flash needs compute capability 8.0 to 12.1 (this card: {_cc(capability)})"
    if call.dtype not in ("float16", "bfloat16"):
        return f"flash runs float16 and bfloat16 only, not {call.dtype}"
    if call.masked:
        return "flash takes no attention mask"
    limit = FLASH_MAX_HEAD_TRAINING_CONSUMER if _consumer_flash(capability) else FLASH_MAX_HEAD
    if call.head_dim > limit:
        return f"flash takes head sizes up to {limit} on {_cc(capability)} (here {call.head_dim})"
    return None


def _efficient_reason(capability: tuple[int, int], call: SdpaCall) -> str | None:
    if not EFFICIENT_RANGE[0] <= capability <= EFFICIENT_RANGE[1]:
        return f"memory-efficient attention needs compute capability 5.0 to 12.1 (this card: {_cc(capability)})"
    if call.dtype == "bfloat16" and capability < NATIVE_BF16:
        return f"memory-efficient attention runs bfloat16 from compute capability 8.0 (this card: {_cc(capability)})"
    if call.enable_gqa and call.grouped:
        return "memory-efficient attention does not take grouped-query attention (enable_gqa) in torch 2.13"
    alignment = _efficient_alignment(capability, call.dtype)
    if call.head_dim % alignment:
        return f"memory-efficient attention needs a head size that is a multiple of {alignment} (here {call.head_dim})"
    return None


def _efficient_alignment(capability: tuple[int, int], dtype: str) -> int:
    """torch's `minimum_gemm_alignment`: the head size's multiple for the CUTLASS kernels."""
    half = dtype != "float32"
    tensor_cores = capability >= (8, 0) or (capability >= (7, 0) and half)
    alignment = 4 if capability >= (8, 0) else 1
    return max(alignment, 128 // (16 if half else 32)) if tensor_cores else alignment


def _consumer_flash(capability: tuple[int, int]) -> bool:
    return (8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= (12, 1)


def torch_choice(capability: tuple[int, int], call: SdpaCall,
                 enabled: Collection[Kernel] = TORCH_PRIORITY) -> Kernel | None:
    """The kernel torch 2.13 runs `call` with on a card of `capability`, among the `enabled` ones (what
    `torch.nn.attention.sdpa_kernel` left on), or None when none can (torch then raises)."""
    return next((k for k in TORCH_PRIORITY if k in enabled and unsupported_reason(k, capability, call) is None), None)


def choose_kernel(capability: tuple[int, int], dtype: str, masked: bool, query_heads: int, kv_heads: int,
                  head_dim: int) -> KernelChoice:
    """codetune's kernel for one attention call (see the module docstring); a ConfigError when no fused kernel
    can run it on this card."""
    grouped = query_heads != kv_heads
    native = SdpaCall(dtype, masked, query_heads, kv_heads, head_dim, enable_gqa=grouped)
    if unsupported_reason("flash", capability, native) is None:
        return KernelChoice("flash", repeat_kv=False)
    repeated = SdpaCall(dtype, masked, query_heads, query_heads, head_dim)
    if unsupported_reason("efficient", capability, repeated) is None:
        return KernelChoice("efficient", repeat_kv=grouped)
    raise ConfigError(no_kernel_message(capability, dtype, native, repeated))


def no_kernel_message(capability: tuple[int, int], dtype: str, native: SdpaCall, repeated: SdpaCall) -> str:
    reasons = "; ".join(r for r in (unsupported_reason("flash", capability, native),
                                    unsupported_reason("efficient", capability, repeated)) if r)
    fix = ("--model.dtype auto (float16 on this card) or float32" if dtype == "bfloat16" and capability < NATIVE_BF16
           else "--model.dtype auto")
    return (f"no fused attention kernel runs {dtype} attention with head size {native.head_dim} on a card of compute "
            f"capability {_cc(capability)} ({reasons}), so attention would fall back to the math kernel, which keeps "
            f"[batch, heads, seq, seq] fp32 scores (GiBs at long windows). Use {fix}, or --model.attn_implementation "
            f"eager (its [seq, seq] scores are in the memory plan).")


@dataclass(frozen=True)
class AttentionPlan:
    """The attention kernels of a run: one for micro-batches without a file boundary, one for those with."""

    implementation: str
    """--model.attn_implementation: sdpa, eager or flash_attention_2."""
    unmasked: str
    """Kernel of a micro-batch without a file boundary: flash, efficient, eager, flash_attention_2, or 'cpu'
    (torch's own choice: no card)."""
    masked: str
    """Kernel of a micro-batch with one (isolated packing)."""
    repeat_kv: bool = False
    """Key and value are repeated to the query heads where memory-efficient attention runs."""
    packing: str = "isolated"
    """--data.packing: 'concat' windows have no mask, so only `unmasked` runs."""

    @property
    def kernel(self) -> str:
        """The short name: the one kernel, or 'unmasked+masked' when micro-batches differ."""
        kernels = [self.unmasked] if self.packing == "concat" or self.unmasked == self.masked else [
            self.unmasked, self.masked]
        return "+".join(kernels)

    @property
    def fp32_scores(self) -> bool:
        """Whether a [b, heads, s, s] fp32 tensor is part of attention (eager's probabilities)."""
        return self.implementation == "eager"

    def describe(self) -> str:
        """One line for people: which kernel runs which micro-batches."""
        repeat = ", key/value repeated to the query heads" if self.repeat_kv else ""
        if self.unmasked == "cpu":
            return f"{self.implementation} on the CPU (torch's choice of kernel)"
        if self.implementation != "sdpa":
            scores = " ([b, heads, s, s] fp32 probabilities)" if self.fp32_scores else ""
            return f"{self.implementation}{scores}"
        unmasked = f"{KERNEL_LABELS[self.unmasked]}{'' if self.unmasked == 'flash' else repeat}"
        if self.packing == "concat":
            return f"sdpa: {unmasked}"
        if self.unmasked == self.masked:
            return f"sdpa: {unmasked} for every micro-batch (file boundaries as a mask)"
        return (f"sdpa: {unmasked} without file boundaries (GQA native), {KERNEL_LABELS[self.masked]}{repeat} with "
                f"them (the mask as a bias)")

    def record(self) -> dict[str, object]:
        """The manifest's and `codetune plan --json`'s view."""
        return {"implementation": self.implementation, "kernel": self.kernel, "unmasked": self.unmasked,
                "masked": None if self.packing == "concat" else self.masked, "repeat_kv": self.repeat_kv,
                "fp32_scores": self.fp32_scores, "description": self.describe()}


def attention_plan(implementation: str, capability: tuple[int, int] | None, dtype: str, query_heads: int,
                   kv_heads: int, head_dim: int, packing: str = "isolated") -> AttentionPlan:
    """The kernels a run of `implementation` gets on a card of `capability` (None: the CPU) in `dtype`.

    Raises:
        ConfigError: sdpa on a card where no fused kernel takes `dtype` (bf16 below compute capability 8.0).
    """
    if implementation != "sdpa":
        return AttentionPlan(implementation, implementation, implementation, packing=packing)
    if capability is None:
        return AttentionPlan(implementation, "cpu", "cpu", packing=packing)
    unmasked = choose_kernel(capability, dtype, False, query_heads, kv_heads, head_dim)
    masked = choose_kernel(capability, dtype, True, query_heads, kv_heads, head_dim)
    repeat = masked.repeat_kv if packing != "concat" else unmasked.repeat_kv
    return AttentionPlan(implementation, unmasked.kernel, masked.kernel, repeat, packing)


def parse_capability(text: str) -> tuple[int, int]:
    """A compute capability like ``7.5`` or ``8.9`` (`--capability`), as (major, minor)."""
    major, dot, minor = text.strip().partition(".")
    if not (dot and major.isdigit() and minor.isdigit() and len(minor) == 1):
        raise ConfigError(f"--capability {text!r}: give the card's compute capability as MAJOR.MINOR, e.g. 7.5 "
                          f"(RTX 20xx, GTX 16xx), 8.6 (RTX 30xx), 8.9 (RTX 40xx) or 9.0 (H100).")
    return int(major), int(minor)


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"
