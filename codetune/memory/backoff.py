"""OOM back-off arithmetic: how a failed optimizer step is cut more finely (`BackOff`), and the fault injector.

An optimizer batch of `B` windows is run as micro-batches of `m` windows, `ceil(B / m)` of them
(gradient accumulation). After an out-of-memory error the same batch is run again with `m // 2`:
the windows, their order, the loss normalisation (summed token losses divided by the batch's target
count) and so the gradient are those of the failed attempt, up to float summation order. At `m == 1`
there is nothing left to halve; `oom_at_minimum_message` says what to change instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

INJECT_OOM_ENV = "CODETUNE_INJECT_OOM"
# How a failed device allocation reads when it does not surface as torch.OutOfMemoryError: cuBLAS and cuDNN
# allocate their own workspaces (first matmul after an OOM, a new shape) and report it in a RuntimeError.
_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory",
                        "CUDA error: out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the device running out of memory: torch's OutOfMemoryError, or a RuntimeError in
    which cuBLAS, cuDNN or the CUDA runtime say an allocation failed."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _ALLOCATION_FAILURES)


def accumulation_steps(optimizer_batch: int, micro_batch_size: int) -> int:
    """Micro-batches per optimizer batch (the last one may be smaller)."""
    return math.ceil(optimizer_batch / micro_batch_size)


def halved(micro_batch_size: int) -> int | None:
    """The next micro-batch after an OOM, or None at 1."""
    return micro_batch_size // 2 if micro_batch_size > 1 else None


@dataclass(frozen=True)
class BackOff:
    """One halving of the micro-batch at optimizer step `step`: an optimizer batch of `optimizer_batch` windows ran
    at `previous_micro_batch_size` and runs as `micro_batch_size` x `gradient_accumulation_steps` from then on.
    `reason` is "oom" (some rank ran out of memory) or "proactive" (some rank's card was too full)."""

    step: int
    previous_micro_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    optimizer_batch: int
    reason: Literal["oom", "proactive"]

    @classmethod
    def of(cls, step: int, micro_batch_size: int, optimizer_batch: int,
           reason: Literal["oom", "proactive"]) -> BackOff | None:
        """The back-off from `micro_batch_size`; None at 1, where there is nothing left to halve."""
        new = halved(micro_batch_size)
        if new is None:
            return None
        return cls(step, micro_batch_size, new, accumulation_steps(optimizer_batch, new), optimizer_batch, reason)

    def record(self) -> dict[str, Any]:
        """The manifest's entry (`phase_4_training.oom_backoffs`) and the OOM callback's checkpointed event."""
        return {"step": self.step, "micro_batch_size": self.micro_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps, "reason": self.reason}


def oom_at_minimum_message(step: int, seq_len: int | None) -> str:
    window = f" of {seq_len} tokens" if seq_len else ""
    return (
        f"out of device memory at optimizer step {step} with a micro-batch of one window{window}; halving "
        f"cannot go further. To fit, change one of: a shorter --data.seq_len (e.g. half), "
        f"--model.gradient_checkpointing true, a smaller --model.lora_rank, --model.quantization nf4, a smaller "
        f"--model.loss_chunk_size; or close other programs using the GPU. Resume with --ckpt_path last."
    )


@dataclass(frozen=True)
class InjectedOOM:
    """`CODETUNE_INJECT_OOM=<global_step>[@<rank>]`, a testing aid: the first attempt of that optimizer step
    raises `torch.OutOfMemoryError` (on every rank, or only on `rank`) while the micro-batch is above 1."""

    step: int
    rank: int | None = None

    @classmethod
    def parse(cls, value: str | None) -> InjectedOOM | None:
        if not value:
            return None
        step, _, rank = value.partition("@")
        try:
            return cls(int(step), int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{INJECT_OOM_ENV}={value!r}: use <global_step> or <global_step>@<rank>, "
                             f"e.g. 3 or 3@1") from None

    def fires(self, step: int, rank: int, micro_batch_size: int) -> bool:
        return step == self.step and (self.rank is None or self.rank == rank) and micro_batch_size > 1
