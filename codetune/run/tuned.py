"""The tuned model of a finished run: its base, loaded as training loaded it, plus its LoRA adapter.

`codetune generate` and `codetune merge` load it here. The adapter is checked first (`check_adapter_finite`: one
NaN or inf and nothing is loaded), then the base against what the run's manifest recorded (`check_base`): a hub
id loads at the commit the run trained on, a local directory that changed since is refused. peft applies the
adapter exactly as `PeftModel.from_pretrained` would. `training_precision` resolves the run's
`model.quantization` and `model.dtype` for the device at hand as training did (`auto`: 4-bit NF4 on CUDA, in
bf16 from compute capability 8.0 and fp16 below; fp32 on CPU); in float16 the residual stream runs scaled, as in
training (`codetune/model/float16.py`).

Loading hides two notices the model libraries print on every load, and nothing else (`quiet_model_libraries`).
torch, transformers and peft are imported by the functions that use them: the commands check their arguments
before paying seconds for them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from codetune.run.finished import RunConfig

# Two notices the model libraries print on every load, which ask nothing of the user, matched exactly. bitsandbytes
# logs the first when it is imported on a CPU with AVX512-BF16 and the optional `kernels` package is not installed:
# its own CPU code serves instead, and that code runs only for a base forced to 4-bit on a CPU (--model.quantization
# nf4). transformers warns the second when peft reads the deprecated `is_gradient_checkpointing` of a model it wraps.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NO_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
GRADIENT_CHECKPOINTING_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `start`."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextmanager
def quiet_model_libraries() -> Iterator[None]:
    """Within: bitsandbytes' `BNB_NO_KERNELS` record and transformers' `GRADIENT_CHECKPOINTING_DEPRECATION`
    FutureWarning are not shown; every other record of that logger, and every other warning, still is."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    drop = _DropMessage(BNB_NO_KERNELS)
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(GRADIENT_CHECKPOINTING_DEPRECATION),
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


def load_tuned_model(config: RunConfig, device: torch.device, dtype: torch.dtype, quantize: bool) -> PeftModel:
    """The run's base (4-bit NF4 when `quantize`) in `dtype` on `device`, with its adapter, in eval mode."""
    import torch

    from codetune.run.finished import check_adapter_finite, check_base, pinned
    from codetune.model.float16 import scale_residual_stream
    from codetune.model.loading import load_causal_lm

    check_adapter_finite(config.adapter_dir)
    check_base(config)
    # Both notices come from here: bitsandbytes is imported by peft, or by transformers for a 4-bit base.
    with quiet_model_libraries():
        from peft import PeftModel

        base = load_causal_lm(config.base_source, quantize, dtype, config.trust_remote_code,
                              config.attn_implementation, device, **pinned(config))
        if not quantize:
            base = base.to(device)  # a 4-bit base is placed while loading
        model = PeftModel.from_pretrained(base, str(config.adapter_dir), is_trainable=False)
    if dtype == torch.float16 and config.float16_residual_scale > 1:
        # As in training: float16's range holds the residual stream only scaled (codetune/model/float16.py).
        scale_residual_stream(model, config.float16_residual_scale)
    return model.eval()


def training_precision(config: RunConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(4-bit?, compute dtype) that training used on a device of this type (and, on CUDA, this card)."""
    from codetune.model.loading import cuda_capability, resolve_dtype, resolve_quantization

    cuda = device.type == "cuda"
    return resolve_quantization(config.quantization, cuda), resolve_dtype(
        config.dtype, device.type, cuda_capability(device) if cuda else None)
