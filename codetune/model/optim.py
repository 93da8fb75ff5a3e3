"""The optimizer: bitsandbytes' paged 8-bit AdamW for QLoRA on CUDA, plain AdamW elsewhere.

`auto` picks `paged_adamw_8bit` when the base is 4-bit on a CUDA device: its two moments take one
byte per trainable parameter each instead of four (for LoRA r16 on a 1.5B model, ~18M parameters:
0.04 GB instead of 0.15 GB), and paging moves them to host memory when the card is full instead of
failing. Anywhere else `auto` is torch's AdamW (fp32 moments), whose numbers the tests pin down.
`adamw_8bit` (not paged) and `paged_adamw_8bit` run on CPU too (bitsandbytes warns that paging is
CUDA-only and does not page there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

OptimizerName = Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"]


def resolve_optimizer(name: OptimizerName, quantized_4bit: bool, cuda: bool) -> str:
    """The concrete optimizer for `name` (see the module docstring for what `auto` means)."""
    if name != "auto":
        return name
    return "paged_adamw_8bit" if quantized_4bit and cuda else "adamw"


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb  # imported here: its import costs seconds and AdamW needs none of it

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
