"""The optimizer: bitsandbytes' 8-bit AdamW for QLoRA on CUDA, plain AdamW elsewhere.

`auto` picks `adamw_8bit` (bitsandbytes' `AdamW8bit`) when the base is 4-bit on a CUDA device: its
two moments take one byte per value each, plus an fp32 scale per 256 values, instead of four
(torch's AdamW). bitsandbytes keeps fp32 moments for tensors under 4096 values (`min_8bit_size`).
For Qwen2.5-Coder-1.5B with LoRA on the seven projections that is 70 MiB of state with AdamW and
18.5 MiB with `adamw_8bit` at rank 8 (the 56 k/v B matrices, 2048 values each, stay fp32), 141 MiB
and 36 MiB at rank 16. Anywhere else `auto` is torch's AdamW (fp32 moments), whose numbers the
tests pin down.

`paged_adamw_8bit` (`PagedAdamW8bit`) takes the same bytes; it only differs on CUDA, where it
allocates the two uint8 states of a tensor of at least 100,000 values (`get_state_buffer`'s
threshold) in CUDA managed memory, which the driver may move to host memory when the card is
oversubscribed; everything else (smaller tensors, every absmax) is ordinary device memory. For the
1.5B model that is no tensor at rank 8 and the gate/up B and down A matrices at rank 16 (84
tensors, 23 MiB): little to gain, and managed memory is invisible to torch's allocator statistics
(`max_memory_allocated`), which the memory plan is checked against and the VRAM monitor's ``torch_*``
figures report. So `auto` does not page. Both 8-bit optimizers run on CPU too (the paged one warns
that paging is CUDA-only and does not page there).
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
    return "adamw_8bit" if quantized_4bit and cuda else "adamw"


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb  # imported here: its import costs seconds and AdamW needs none of it

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
