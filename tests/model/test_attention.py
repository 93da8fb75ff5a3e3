"""The attention kernel of every SDPA call on an emulated card (Turing 7.5, Ampere 8.0, Hopper 9.0), through the
module's own path: a tiny grouped-query Qwen2 (4 query heads, 2 key/value heads) loaded as fit loads it, LoRA on
every projection, `CodeLoRAModule.hidden_states` on a micro-batch with file boundaries and one without.

On the CPU the kernels themselves cannot run, so the card is emulated in two places: the capability codetune's
attention reads (`codetune.model.attention.device_capability`), and `sdpa_kernel`, whose request is recorded instead
of applied (CPU SDPA has no memory-efficient kernel to restrict to). Each recorded call is then replayed through
torch 2.13's dispatch rules for that card (`codetune.model.kernels.torch_choice`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import codetune.model.attention as attention_lib
from codetune.errors import ConfigError
from codetune.model.attention import BACKENDS, record_sdpa_calls
from codetune.model.kernels import SdpaCall, attention_plan, choose_kernel, torch_choice, unsupported_reason
from codetune.model.loading import apply_lora, keep_adapter_input_dtype, load_causal_lm
from codetune.model.module import CodeLoRAModule

SEQ = 32
# What `--model.dtype auto` trains in on each card.
CARDS = {(7, 5): torch.float16, (8, 0): torch.bfloat16, (9, 0): torch.bfloat16}
KERNEL_OF_BACKEND = {backend: kernel for kernel, backend in BACKENDS.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    directory = tmp_path_factory.mktemp("gqa-qwen2")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def batches() -> dict[str, dict[str, torch.Tensor]]:
    """Two windows without a file boundary (one file longer than a window), and two with one each."""
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    plain = torch.arange(SEQ).repeat(2, 1)
    packed = plain.clone()
    packed[0, 20:] -= 20
    packed[1, 9:] -= 9
    return {"unmasked": {"input_ids": ids, "position_ids": plain, "labels": ids.clone()},
            "masked": {"input_ids": ids, "position_ids": packed, "labels": ids.clone()}}


def emulate_card(monkeypatch, capability: tuple[int, int]) -> list[list[str]]:
    """The card codetune's attention sees; returns the list that each `sdpa_kernel` request is appended to."""
    requested: list[list[str]] = []

    @contextlib.contextmanager
    def recorded_request(backends):
        requested.append([KERNEL_OF_BACKEND[b] for b in backends])
        yield

    monkeypatch.setattr(attention_lib, "device_capability", lambda device: capability)
    monkeypatch.setattr(attention_lib, "sdpa_kernel", recorded_request)
    return requested


def lora_module(model) -> CodeLoRAModule:
    """As configure_model leaves it: LoRA on every projection, taking the 16-bit input as it is."""
    module = CodeLoRAModule(loss_chunk_size=16)
    module.model = apply_lora(model, 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
    keep_adapter_input_dtype(module.model)
    return module


def train_step_calls(module: CodeLoRAModule, dtype: torch.dtype) -> dict[str, list]:
    """The SDPA calls of a forward and backward of each micro-batch, under the autocast training runs in."""
    calls = {}
    for name, batch in batches().items():
        with record_sdpa_calls() as recorded, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, n = module.loss_sum(batch)
        (loss / n).backward()
        calls[name] = recorded
    return calls


@pytest.mark.parametrize("capability", list(CARDS), ids=lambda c: f"{c[0]}.{c[1]}")
def test_every_attention_call_runs_a_fused_kernel_on_each_card(model_dir, capability, monkeypatch):
    dtype = CARDS[capability]
    requested = emulate_card(monkeypatch, capability)
    # The base in the 16-bit dtype, as NF4 computes in it on a card (its rotary tables then keep q and k 16-bit).
    module = lora_module(load_causal_lm(model_dir, False, dtype, False, "sdpa", torch.device("cpu")))
    calls = train_step_calls(module, dtype)
    recorded = calls["unmasked"] + calls["masked"]
    assert len(recorded) == 2 * 2  # two layers, two micro-batches
    # With every kernel enabled, torch would run no call on the math kernel ...
    assert [torch_choice(capability, c.call) for c in recorded].count("math") == 0
    # ... and codetune enables exactly one kernel for each call, one that can run it on this card.
    assert len(requested) == len(recorded), "every SDPA call must run with one kernel chosen by codetune"
    kernels = {}
    for (name, group), one in zip([(n, c) for n, cs in calls.items() for c in cs], requested):
        assert len(one) == 1
        assert torch_choice(capability, group.call, enabled=one) == one[0], (name, group.call)
        kernels.setdefault(name, set()).add(one[0])
    flash = capability >= (8, 0)
    assert kernels == {"unmasked": {"flash" if flash else "efficient"}, "masked": {"efficient"}}
    # Flash takes the 2 key/value heads as they are; the memory-efficient kernel gets them repeated to 4.
    for name, group in calls.items():
        heads = {(c.call.kv_heads, c.call.enable_gqa) for c in group}
        assert heads == ({(2, True)} if name == "unmasked" and flash else {(4, False)})
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["8.0", "9.0"])
def test_fp32_runs_the_memory_efficient_kernel_on_any_card(model_dir, capability, monkeypatch):
    requested = emulate_card(monkeypatch, capability)
    module = lora_module(load_causal_lm(model_dir, False, torch.float32, False, "sdpa", torch.device("cpu")))
    calls = train_step_calls(module, torch.float32)
    assert requested == [["efficient"]] * 4
    assert all(torch_choice(capability, c.call) == "efficient" for group in calls.values() for c in group)


def test_transformers_sdpa_falls_to_the_math_kernel_on_turing_and_in_fp32(model_dir):
    """The failure this attention exists for: transformers' own sdpa passes enable_gqa=True for a micro-batch
    without a mask, which only flash (8.0+, 16-bit) takes in torch 2.13."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float16)
    module = lora_module(model.train())
    calls = train_step_calls(module, torch.float16)
    unmasked, masked = calls["unmasked"][0].call, calls["masked"][0].call
    assert unmasked.enable_gqa and unmasked.kv_heads == 2
    assert torch_choice((7, 5), unmasked) == "math"
    assert torch_choice((7, 5), masked) == "efficient"
    assert torch_choice((8, 0), unmasked) == "flash"
    assert torch_choice((9, 0), SdpaCall("float32", False, 4, 2, 16, enable_gqa=True)) == "math"


def test_codetune_attention_computes_what_transformers_sdpa_computes(model_dir, monkeypatch):
    """Same logits, masked or not, and the same greedy generation from left-padded prompts (a mask and a cache),
    on the CPU and on an emulated Turing card (key and value repeated even without a mask)."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    ours = load_causal_lm(model_dir, False, torch.float32, False, "sdpa", torch.device("cpu")).eval()
    assert ours.config._attn_implementation == attention_lib.ATTENTION_IMPLEMENTATION
    prompts = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    padding = torch.ones_like(prompts)
    padding[0, :4] = 0
    for capability in (None, (7, 5)):
        if capability:
            emulate_card(monkeypatch, capability)
        with torch.no_grad():
            for batch in batches().values():
                torch.testing.assert_close(ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                                           reference(input_ids=batch["input_ids"],
                                                     position_ids=batch["position_ids"]).logits)
            generated = ours.generate(prompts, attention_mask=padding, max_new_tokens=6, do_sample=False)
            expected = reference.generate(prompts, attention_mask=padding, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, expected)


def test_bf16_on_turing_has_no_fused_kernel_and_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--model.dtype auto \(float16 on this card\)") as err:
        choose_kernel((7, 5), "bfloat16", False, 12, 2, 128)
    assert "compute capability 7.5" in str(err.value) and "math kernel" in str(err.value)
    with pytest.raises(ConfigError):
        attention_plan("sdpa", (7, 5), "bfloat16", 12, 2, 128)
    # eager is the user's explicit choice: its scores are in the plan, not refused.
    assert attention_plan("eager", (7, 5), "bfloat16", 12, 2, 128).fp32_scores


def test_the_plan_names_the_kernels_of_each_card():
    turing = attention_plan("sdpa", (7, 5), "float16", 12, 2, 128)
    assert (turing.unmasked, turing.masked, turing.repeat_kv, turing.kernel) == ("efficient", "efficient", True,
                                                                                 "efficient")
    assert "memory-efficient" in turing.describe() and "repeated" in turing.describe()
    hopper = attention_plan("sdpa", (9, 0), "bfloat16", 12, 2, 128)
    assert (hopper.unmasked, hopper.masked, hopper.kernel) == ("flash", "efficient", "flash+efficient")
    assert attention_plan("sdpa", (9, 0), "bfloat16", 12, 2, 128, packing="concat").kernel == "flash"
    assert attention_plan("sdpa", None, "float32", 12, 2, 128).kernel == "cpu"
    assert attention_plan("sdpa", (8, 6), "float32", 12, 2, 128).kernel == "efficient"


def test_dispatch_rules_of_torch_2_13():
    """The constraints the choice rests on (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp)."""
    gqa = SdpaCall("float16", False, 12, 2, 128, enable_gqa=True)
    assert unsupported_reason("flash", (7, 5), gqa) and unsupported_reason("efficient", (7, 5), gqa)
    assert unsupported_reason("flash", (8, 0), gqa) is None
    repeated = SdpaCall("float16", True, 12, 12, 128)
    assert unsupported_reason("efficient", (7, 5), repeated) is None
    assert unsupported_reason("flash", (9, 0), repeated) == "flash takes no attention mask"
    assert unsupported_reason("efficient", (7, 5), SdpaCall("bfloat16", True, 12, 12, 128))
    assert unsupported_reason("efficient", (7, 5), SdpaCall("float16", True, 12, 12, 20))  # not a multiple of 8
    assert unsupported_reason("efficient", (7, 5), SdpaCall("float32", True, 12, 12, 20)) is None
    assert unsupported_reason("flash", (8, 6), SdpaCall("bfloat16", False, 8, 8, 256))
    assert torch_choice((7, 5), gqa, enabled=("flash", "efficient")) is None
