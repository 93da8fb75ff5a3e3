"""codetune's SDPA attention for transformers: the kernel of each call chosen explicitly (codetune/model/kernels.py).

`--model.attn_implementation sdpa` loads the model with `ATTENTION_IMPLEMENTATION`, an attention function
registered with transformers' `AttentionInterface` (and transformers' own sdpa mask under the same name in
`AttentionMaskInterface`, so masks are built exactly as for `sdpa`: none for a micro-batch without a file
boundary, a block-diagonal boolean one otherwise). For each call on a CUDA card it asks
`codetune.model.kernels.choose_kernel` which kernel runs it, repeats key and value to the query heads when
that kernel needs it, and calls `torch.nn.functional.scaled_dot_product_attention` with only that kernel
enabled (`torch.nn.attention.sdpa_kernel`): the math kernel is never a silent fallback. On the CPU torch keeps
its own choice and grouped-query attention is native where there is no mask, as in transformers' sdpa.

`record_sdpa_calls` records every SDPA call (what decides the kernel, which kernels were enabled, and on a
CUDA card the kernel torch's dispatcher picks): the GPU check counts math-kernel calls with it, and tests
replay the calls through `codetune.model.kernels.torch_choice` for an emulated card.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from codetune.errors import ConfigError
from codetune.model.kernels import Kernel, KernelChoice, SdpaCall, choose_kernel

# The name models are loaded with for --model.attn_implementation sdpa.
ATTENTION_IMPLEMENTATION = "codetune_sdpa"
BACKENDS: dict[Kernel, SDPBackend] = {"flash": SDPBackend.FLASH_ATTENTION,
                                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_BACKEND_NAMES = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
                  SDPBackend.MATH: "math", SDPBackend.CUDNN_ATTENTION: "cudnn"}


def loaded_implementation(attn_implementation: str) -> str:
    """The `attn_implementation` to load a model with: codetune's registered attention for 'sdpa'."""
    if attn_implementation != "sdpa":
        return attn_implementation
    register()
    return ATTENTION_IMPLEMENTATION


def register() -> None:
    """Register the attention function and its mask (transformers' sdpa mask) under `ATTENTION_IMPLEMENTATION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, None elsewhere (torch chooses the CPU's kernel itself)."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_for(query: torch.Tensor, key: torch.Tensor, masked: bool) -> KernelChoice | None:
    """The kernel of this call on its device (None on the CPU)."""
    capability = device_capability(query.device)
    if capability is None:
        return None
    return choose_kernel(capability, dtype_name(query.dtype), masked, query.shape[1], key.shape[1], query.shape[-1])


def sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (q, k, v as [b, heads, s, d]; returns [b, s, heads, d])."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ConfigError("this model's attention uses a soft cap or a position bias, which codetune's sdpa "
                          "attention does not run: use --model.attn_implementation eager.")
    choice = kernel_for(query, key, attention_mask is not None)
    grouped = key.shape[1] != query.shape[1]
    repeat = choice.repeat_kv if choice is not None else grouped and attention_mask is not None
    if repeat:
        key, value = repeat_heads(key, query.shape[1]), repeat_heads(value, query.shape[1])
    q_len = query.shape[2]
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None else
                                                         getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_len:
        # A prefill against a longer cache: SDPA's causal mask is aligned top-left, the cache's future is empty.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    with sdpa_kernel([BACKENDS[choice.kernel]]) if choice is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=causal, enable_gqa=grouped and not repeat)
    return out.transpose(1, 2).contiguous(), None


def repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, heads, s, d], query head h reading key/value head h // (heads // kv_heads), as
    transformers' `repeat_kv` (an expanded view copied once; its backward saves nothing)."""
    batch, kv_heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, dim).reshape(batch, heads, seq, dim)


# -- recording calls ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    """One SDPA call: what decides its kernel, the kernels enabled then, and torch's pick on a CUDA card."""

    call: SdpaCall
    enabled: frozenset[str]
    device: str
    picked: str | None
    """The kernel torch's dispatcher picks (CUDA only; None on the CPU, where it means nothing for a card)."""


def enabled_kernels() -> frozenset[str]:
    """The SDPA kernels enabled now (`sdpa_kernel` contexts and `torch.backends.cuda.enable_*_sdp`)."""
    backends = torch.backends.cuda
    flags = {"flash": backends.flash_sdp_enabled(), "efficient": backends.mem_efficient_sdp_enabled(),
             "math": backends.math_sdp_enabled(), "cudnn": backends.cudnn_sdp_enabled()}
    return frozenset(name for name, on in flags.items() if on)


@contextlib.contextmanager
def record_sdpa_calls() -> Iterator[list[RecordedCall]]:
    """Within: every `torch.nn.functional.scaled_dot_product_attention` call is recorded in the yielded list."""
    calls: list[RecordedCall] = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, **kwargs):
        call = SdpaCall(dtype_name(query.dtype), attn_mask is not None, query.shape[-3], key.shape[-3],
                        query.shape[-1], enable_gqa)
        picked = None
        if query.is_cuda:
            choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
            picked = _BACKEND_NAMES.get(SDPBackend(choice), "none")
        calls.append(RecordedCall(call, enabled_kernels(), query.device.type, picked))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original
