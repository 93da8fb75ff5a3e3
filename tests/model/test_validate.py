"""The model's settings checks: every bad value of `CodeLoRAModule` is one ConfigError naming its flag, and
`resolve_dtype` picks the compute dtype from the device's compute capability, never from emulated bf16."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from codetune.errors import ConfigError
from codetune.model.loading import cuda_capability, resolve_dtype
from codetune.model.module import CodeLoRAModule


@pytest.mark.parametrize(("setting", "message"), [
    ({"lora_rank": 0}, "--model.lora_rank=0: must be >= 1"),
    ({"lora_alpha": 0}, "--model.lora_alpha=0: must be > 0"),
    ({"lora_dropout": -0.1}, "--model.lora_dropout=-0.1: must be in [0, 1)"),
    ({"lora_dropout": 1.0}, "--model.lora_dropout=1.0: must be in [0, 1)"),
    ({"learning_rate": 0.0}, "--model.learning_rate=0.0: must be a positive number"),
    ({"learning_rate": math.nan}, "--model.learning_rate=nan: must be a positive number"),
    ({"learning_rate": math.inf}, "--model.learning_rate=inf: must be a positive number"),
    ({"warmup_steps": -1}, "--model.warmup_steps=-1: must be >= 0"),
    ({"micro_batch_size": 0}, "--data.batch_size=0: must be >= 1"),
    ({"loss_chunk_size": 0}, "--model.loss_chunk_size=0: must be a positive integer or null"),
])
def test_each_bad_setting_is_a_config_error_naming_its_flag(setting, message):
    with pytest.raises(ConfigError) as raised:
        CodeLoRAModule(**setting)
    assert str(raised.value).startswith(message)  # the flag, the value and what is allowed


@pytest.mark.parametrize("setting", [{"lora_dropout": 0.0}, {"warmup_steps": 0}, {"micro_batch_size": "auto"},
                                     {"loss_chunk_size": None}, {"lora_rank": 1, "lora_alpha": 1}])
def test_the_edge_of_each_allowed_range_is_accepted(setting):
    assert CodeLoRAModule(**setting).hparams.items() >= setting.items()


def test_every_bad_setting_is_reported_in_one_error():
    with pytest.raises(ConfigError) as raised:
        CodeLoRAModule(lora_rank=0, learning_rate=-1.0, loss_chunk_size=0)
    assert str(raised.value) == ("--model.lora_rank=0: must be >= 1 (e.g. 8 or 16); --model.learning_rate=-1.0: must "
                                 "be a positive number (e.g. 1e-4); --model.loss_chunk_size=0: must be a positive "
                                 "integer or null")


@pytest.fixture
def card(monkeypatch):
    """A CUDA card of a given compute capability; torch says bf16 is supported on all of them (by emulation
    below 8.0, as it does on a real Turing card)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def plug(capability: tuple[int, int] | None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return plug


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                       ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_on_cuda_is_bf16_only_from_ampere(card, capability, expected):
    card(capability)
    assert cuda_capability(0) == capability
    assert resolve_dtype("auto", "cuda", cuda_capability(0)) == expected


def test_auto_without_cuda_is_fp32(card):
    card(None)
    assert cuda_capability(0) is None
    assert resolve_dtype("auto", "cpu", cuda_capability(0)) == torch.float32
    assert resolve_dtype("auto", "mps") == torch.float32


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                 ("float32", torch.float32)])
def test_an_explicit_dtype_is_taken_on_every_device(dtype, expected):
    for device_type, capability in (("cpu", None), ("cuda", (7, 5)), ("cuda", (8, 0))):
        assert resolve_dtype(dtype, device_type, capability) == expected


@pytest.mark.parametrize("dtype", ["half", "float64", "bf16", "int8", "cuda", "AUTO", ""])
def test_a_bad_dtype_is_a_config_error_naming_the_flag(dtype):
    # "half" and "float64" are torch attributes: without the check they would load in a dtype nobody chose.
    with pytest.raises(ConfigError) as raised:
        resolve_dtype(dtype, "cuda", (8, 0))
    assert str(raised.value).startswith(f"--model.dtype {dtype!r}") and "auto, bfloat16, float16, float32" in str(
        raised.value)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_generate_resolves_auto_as_training_did_on_the_same_card(card, capability, expected):
    from codetune.run.tuned import training_precision

    card(capability)
    config = SimpleNamespace(quantization="auto", dtype="auto")
    assert training_precision(config, torch.device("cuda", 0)) == (True, expected)
