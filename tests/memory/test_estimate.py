"""The memory plan against real models: exact parameter and weight bytes, and activations measured on CPU.

Parameter counts come from the real transformers/peft modules built on the meta device (no memory,
no download). Activations come from a tiny Qwen2 (hidden 256, 2 layers, vocab 4096, 2 x 256
tokens) trained one step on CPU the way `CodeLoRAModule.loss_sum` does it, measured twice:
saved-tensor hooks (unique storages autograd saves in the forward) and a live-storage tracker (every
storage created during the step and still referenced: what `torch.cuda.memory_allocated` would
count on a GPU, kernel workspaces aside). A 16-bit step runs as on CUDA under Lightning's mixed
precision: weights in 16-bit, LoRA weights fp32 with peft's input cast off, forward and backward
inside `torch.autocast` (here the CPU one, which autocasts the same ops the model uses). The CPU
kernels differ from CUDA's in one way the plan models (`device="cpu"`: dropout keeps its noise
tensor in the compute dtype, not a bool mask).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch
from helpers import emulated_card
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from codetune.memory.estimate import plan_memory
from codetune.memory.persistent import base_parameter_count, lora_parameter_count, nf4_bytes, quantized_parameter_count
from codetune.memory.shapes import DEFAULT_LORA_TARGETS, MemoryPlan, ModelShape, TrainingShape
from codetune.memory.units import GiB
from codetune.model.attention import loaded_implementation
from codetune.model.loss import causal_lm_loss_sum

QWEN_CODER_1_5B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
# GQA (4 query heads, 2 KV heads) so that repeat_kv happens; the MLP size is not a multiple of hidden.
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024)
BATCH, SEQ = 2, 256
# A wider MLP (6 x hidden, as in the 1.5B model) makes the forward's end and the MLP's backward the peak.
WIDE = dict(TINY, intermediate_size=1536)
# The saved activations match to the byte, and so does the step's peak at these sizes; 0.5% leaves
# room for a stray small buffer while a missing [tokens, hidden] term still fails.
TOLERANCE = 0.005
# What is alive after forward besides the activations: the loss sum and the target count (0-dim).
SCALARS = 64


def _qwen2_config(**sizes):
    from transformers import Qwen2Config

    return Qwen2Config(**sizes)


def _meta_model(config, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _with_lora(model, rank, targets=DEFAULT_LORA_TARGETS, dropout=0.05, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(targets),
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- parameter counts and weight bytes --------------------------------------------------------------


def test_shape_is_read_from_a_qwen2_config():
    shape = ModelShape.from_config(_qwen2_config(**QWEN_CODER_1_5B))
    assert (shape.head_size, shape.qkv_bias, shape.o_bias, shape.tie_word_embeddings) == (128, True, False, True)
    assert shape.projections()["k_proj"] == (1536, 256, True)


@pytest.mark.parametrize("rank", [8, 16])
def test_counts_match_qwen2_5_coder_1_5b_built_on_meta(rank):
    config = _qwen2_config(**QWEN_CODER_1_5B)
    shape = ModelShape.from_config(config)
    model = _meta_model(config)
    decoder_linears = [m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert base_parameter_count(shape) == sum(p.numel() for p in model.parameters()) == 1_543_714_304
    assert quantized_parameter_count(shape) == sum(m.weight.numel() for m in decoder_linears)
    assert lora_parameter_count(shape, rank, DEFAULT_LORA_TARGETS) == _trainable(_with_lora(model, rank))


def test_counts_match_an_untied_llama_with_full_modules():
    from codetune.model.tiny import tiny_config

    config = tiny_config(vocab_size=2048, hidden_size=128)
    shape = ModelShape.from_config(config)
    model = _meta_model(config)
    assert base_parameter_count(shape) == sum(p.numel() for p in model.parameters())
    peft_model = _with_lora(model, 8, ["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    training = TrainingShape(lora_rank=8, lora_target_modules=("q_proj", "v_proj"),
                             modules_to_save=("embed_tokens", "lm_head"))
    plan = plan_memory(shape, training)
    lora = lora_parameter_count(shape, 8, ["q_proj", "v_proj"])
    # LoRA in fp32, the two full copies in bf16 (2 bytes), as peft makes them.
    assert _trainable(peft_model) == lora + 2 * shape.vocab_size * shape.hidden_size
    assert plan.lora_params == 4 * lora + 2 * 2 * shape.vocab_size * shape.hidden_size
    assert plan.optimizer_state == 2 * plan.lora_params == 2 * plan.lora_grads


def test_lora_weights_are_fp32_on_a_bf16_base():
    model = _with_lora(_meta_model(_qwen2_config(**TINY)), 8)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_nf4_bytes_match_bitsandbytes_double_quantization():
    import bitsandbytes.functional as bnb

    weight = torch.randn(688, 256, dtype=torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    parts = [packed, state.absmax, state.state2.absmax, state.offset, state.code]
    assert nf4_bytes(weight.numel()) == sum(t.nbytes for t in parts)


def test_the_plan_imports_no_lightning_and_no_torch():
    modules = ", ".join(f"codetune.memory.{name}" for name in ("checks", "estimate", "persistent", "ram", "report",
                                                                "search", "shapes", "activations", "units"))
    code = f"import sys, {modules}; print(sorted({{'lightning', 'torch'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- activations, measured on CPU ---------------------------------------------------------------


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still referenced, after every op, and their peak.

    A view of (or an in-place op on) a tensor made outside the mode, such as a parameter's ``.t()``,
    is not counted: it allocates nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            known = self.live.get(ref.cdata)
            if known is None and ref.cdata in inputs:
                continue
            if known is None or known[0].expired():
                self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.now())
        return out

    def now(self) -> int:
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        return sum(size for _, size in self.live.values())


@dataclass(frozen=True)
class Measured:
    saved_by_hooks: int
    live_after_forward: int
    step_peak: int


def _tiny_lora_model(training: TrainingShape, dtype: torch.dtype, tmp_dir: str | None, sizes: dict = TINY):
    from transformers import AutoModelForCausalLM

    from codetune.model.loading import apply_lora, enable_gradient_checkpointing, load_causal_lm

    torch.manual_seed(0)
    config = _qwen2_config(**sizes)
    if training.quantization == "nf4":
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_dir)
        model = load_causal_lm(tmp_dir, True, dtype, False, training.attn_implementation, torch.device("cpu"))
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_loaded_attention(training))
        model.train()
    if training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_lora(model, training.lora_rank, 2 * training.lora_rank, training.lora_dropout,
                       list(training.lora_target_modules))
    if dtype != torch.float32:
        # As the module does under mixed precision: an adapter sees the 16-bit input, not an fp32 copy.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def _loaded_attention(training: TrainingShape) -> str:
    """The attention a model is built with: codetune's sdpa where the plan's unmasked kernel is the memory-efficient
    one (what Turing and fp32 get), else the implementation as named."""
    if training.attn_implementation == "sdpa" and training.unmasked_kernel == "efficient":
        return loaded_implementation("sdpa")
    return training.attn_implementation


def _card_of(training: TrainingShape):
    """An emulated Turing card where the plan's unmasked kernel is the memory-efficient one (k/v repeated)."""
    return emulated_card((7, 5)) if training.unmasked_kernel == "efficient" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _measure(training: TrainingShape, dtype: torch.dtype, wide: bool = False) -> Measured:
    return _measure_model(_tiny_lora_model(training, dtype, None, WIDE if wide else TINY), training, dtype)


@contextlib.contextmanager
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core runner two threads spin 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _measure_model(model, training: TrainingShape, dtype: torch.dtype) -> Measured:
    """One training micro-batch: what autograd saves, what is alive after forward, and the step's peak.

    A 16-bit model runs forward and backward inside one autocast region, as Lightning's mixed precision
    runs a training step (manual optimization: the backward is inside `training_step`).
    """
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with _one_thread(), autocast, _card_of(training):
        return _run_step(model, training)


def _run_step(model, training: TrainingShape) -> Measured:
    causal_lm = model.get_base_model()
    # As after the first micro-batch of an accumulation step: gradients exist, so backward adds in place.
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    ids = torch.randint(0, TINY["vocab_size"], (training.micro_batch_size, training.seq_len))
    positions = torch.arange(training.seq_len).repeat(training.micro_batch_size, 1)
    if training.packed_windows:
        boundary = training.seq_len * 3 // 5  # a second file starts here in every window
        positions[:, boundary:] -= boundary
    parameters = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in parameters:
            saved[ref.cdata] = t.untyped_storage().nbytes()
        return t

    tracker = LiveStorages()
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = causal_lm.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
            loss_sum, n_targets = causal_lm_loss_sum(hidden, causal_lm.get_output_embeddings(), ids,
                                                     training.loss_chunk_size)
        del hidden
        after_forward = tracker.now()
        (loss_sum / n_targets).backward()
    return Measured(sum(saved.values()), after_forward, tracker.peak)


def _tiny_training(**changes) -> TrainingShape:
    base = TrainingShape(seq_len=SEQ, micro_batch_size=BATCH, quantization="none", compute_dtype_bytes=4,
                         loss_chunk_size=256, device="cpu")
    return replace(base, **changes)


# name: (training, dtype, WIDE sizes?, the transient that must be the peak)
CASES = {
    "fp32": (_tiny_training(), torch.float32, False, "loss_chunk"),
    "fp32-checkpointing": (_tiny_training(gradient_checkpointing=True), torch.float32, False, "layer_backward"),
    "fp32-unpacked": (_tiny_training(packed_windows=False), torch.float32, False, "loss_chunk"),
    # Windows without a file boundary on Turing (or in fp32): memory-efficient attention, k/v repeated.
    "fp32-unpacked-efficient": (_tiny_training(packed_windows=False, unmasked_kernel="efficient"), torch.float32,
                                False, "loss_chunk"),
    "fp32-plain-loss": (_tiny_training(loss_chunk_size=None), torch.float32, False, "loss_chunk"),
    "fp32-no-dropout-checkpointing": (_tiny_training(lora_dropout=0.0, gradient_checkpointing=True), torch.float32,
                                      False, "loss_chunk"),
    "fp32-small-chunk-wide": (_tiny_training(loss_chunk_size=16), torch.float32, True, "forward_transient"),
    "fp32-no-dropout-small-chunk-wide": (_tiny_training(loss_chunk_size=16, lora_dropout=0.0), torch.float32, True,
                                         "layer_backward"),
    "bf16": (_tiny_training(compute_dtype_bytes=2), torch.bfloat16, False, "loss_chunk"),
    "bf16-no-dropout": (_tiny_training(compute_dtype_bytes=2, lora_dropout=0.0), torch.bfloat16, False, "loss_chunk"),
    "bf16-eager": (_tiny_training(compute_dtype_bytes=2, attn_implementation="eager"), torch.bfloat16, False,
                   "loss_chunk"),
    "bf16-eager-no-dropout": (_tiny_training(compute_dtype_bytes=2, attn_implementation="eager", lora_dropout=0.0),
                              torch.bfloat16, False, "loss_chunk"),
    "bf16-checkpointing": (_tiny_training(compute_dtype_bytes=2, gradient_checkpointing=True), torch.bfloat16, False,
                           "loss_chunk"),
    "bf16-plain-loss": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=None), torch.bfloat16, False,
                        "loss_chunk"),
    # A small loss chunk leaves the backward of the final norm, of the last layer or the forward's end as the peak.
    "bf16-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16), torch.bfloat16, False,
                         "norm_backward"),
    "bf16-unpacked-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16, packed_windows=False),
                                  torch.bfloat16, False, "norm_backward"),
    "bf16-small-chunk-wide": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16), torch.bfloat16, True,
                              "forward_transient"),
    "bf16-no-dropout-small-chunk-wide": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16, lora_dropout=0.0),
                                         torch.bfloat16, True, "layer_backward"),
    "bf16-checkpointing-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16,
                                                      gradient_checkpointing=True), torch.bfloat16, False,
                                       "layer_backward"),
    "bf16-no-dropout-checkpointing-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16,
                                                                 lora_dropout=0.0, gradient_checkpointing=True),
                                                  torch.bfloat16, False, "layer_backward"),
    # fp16 (Turing's 16-mixed) takes the bytes bf16 takes.
    "fp16-unpacked-efficient-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16,
                                                           packed_windows=False, unmasked_kernel="efficient"),
                                            torch.float16, False, "norm_backward"),
    "fp16-checkpointing-small-chunk": (_tiny_training(compute_dtype_bytes=2, loss_chunk_size=16,
                                                      gradient_checkpointing=True), torch.float16, False,
                                       "layer_backward"),
}
TRANSIENTS = ("loss_chunk", "norm_backward", "layer_backward", "forward_transient")


def _relative_error(estimate: int, measured: int) -> float:
    return abs(estimate - measured) / measured


def _case_plan(case: str) -> MemoryPlan:
    training, _, wide, _ = CASES[case]
    return plan_memory(ModelShape.from_config(_qwen2_config(**(WIDE if wide else TINY))), training)


def _unsaved_autocast_copies(plan: MemoryPlan) -> int:
    """Autocast's copies of the first layer's q/k/v A weights: cached, but not saved (their input needs no grad)."""
    if plan.training.compute_dtype_bytes == 4:
        return 0
    q, k, v = (plan.model.projections()[name][0] for name in ("q_proj", "k_proj", "v_proj"))
    return plan.training.compute_dtype_bytes * plan.training.lora_rank * (q + k + v)


@pytest.mark.parametrize("case", CASES)
def test_activations_match_what_autograd_saves(case):
    training, dtype, wide, _ = CASES[case]
    measured = _measure(training, dtype, wide)
    plan = _case_plan(case)
    alive = plan.activations + plan.autocast_copies
    assert abs(alive - measured.live_after_forward) <= SCALARS
    if training.gradient_checkpointing:
        # Hooks see only the checkpoints' positional inputs; cos/sin and the mask ride in their closures.
        assert measured.saved_by_hooks < measured.live_after_forward
        without = plan_memory(plan.model, replace(training, gradient_checkpointing=False))
        assert plan.activations < 0.2 * without.activations
    else:
        # Everything alive is something autograd saved, but for the loss's scalars and a few weight copies.
        unsaved = measured.live_after_forward - measured.saved_by_hooks - _unsaved_autocast_copies(plan)
        assert 0 <= unsaved <= SCALARS


@pytest.mark.parametrize("case", CASES)
def test_step_peak_matches_the_live_storages(case):
    training, dtype, wide, peak_term = CASES[case]
    measured = _measure(training, dtype, wide)
    plan = _case_plan(case)
    assert max(TRANSIENTS, key=lambda name: getattr(plan, name)) == peak_term
    assert _relative_error(plan.step, measured.step_peak) <= TOLERANCE


def test_autocast_copies_are_the_lora_weights_in_16_bit():
    model = _tiny_lora_model(_tiny_training(compute_dtype_bytes=2), torch.bfloat16, None)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _case_plan("bf16").autocast_copies == 2 * lora == 2 * 73_984
    assert _case_plan("fp32").autocast_copies == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_4bit_weights_and_step_match_a_loaded_nf4_model(tmp_path, checkpointing, dtype):
    import bitsandbytes as bnb

    # A small loss chunk, so that with checkpointing the last layer's re-run is the peak.
    training = _tiny_training(quantization="nf4", gradient_checkpointing=checkpointing, loss_chunk_size=16,
                              compute_dtype_bytes=dtype.itemsize)
    plan = plan_memory(ModelShape.from_config(_qwen2_config(**TINY)), training)
    model = _tiny_lora_model(training, dtype, str(tmp_path))
    quantized = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    nf4 = sum(w.untyped_storage().nbytes() + sum(t.nbytes for t in (w.quant_state.absmax, w.quant_state.offset,
              w.quant_state.code, w.quant_state.state2.absmax)) for w in quantized)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters()
                 if not p.requires_grad and not isinstance(p, bnb.nn.Params4bit))
    assert (plan.weights_4bit, plan.weights_16bit) == (nf4, frozen)
    measured = _measure_model(model, training, dtype)
    assert abs(plan.activations + plan.autocast_copies - measured.live_after_forward) <= SCALARS
    assert _relative_error(plan.step, measured.step_peak) <= TOLERANCE


# -- the loss term, monotonicity --------------------------------------------------------------------------


QWEN = ModelShape(**QWEN_CODER_1_5B, head_dim=128, qkv_bias=True)


def test_loss_chunk_scales_with_the_chunk_not_the_batch():
    vocab = QWEN.vocab_size
    plans = {(micro, chunk): plan_memory(QWEN, TrainingShape(micro_batch_size=micro, loss_chunk_size=chunk))
             for micro in (1, 4) for chunk in (256, 1024)}
    # Three fp32 [chunk, vocab] buffers whatever the micro-batch (the chunk counts tokens of the batch).
    # Plus the gradients of the chunks done so far, [tokens - chunk, hidden] in bf16.
    waiting = {(micro, chunk): (micro * 2048 - chunk) * 1536 * 2 for micro, chunk in plans}
    logits = {key: plan.loss_chunk - waiting[key] for key, plan in plans.items()}
    assert logits[(1, 256)] == logits[(4, 256)] == 3 * 4 * 256 * vocab
    assert logits[(4, 1024)] == 4 * logits[(4, 256)]
    plain = plan_memory(QWEN, TrainingShape(micro_batch_size=1, loss_chunk_size=None))
    at_least_the_batch = plan_memory(QWEN, TrainingShape(micro_batch_size=1, loss_chunk_size=4096))
    n = 2047
    # The plain path saves the fp32 log-probabilities; its backward adds two more of them.
    assert plain.loss_chunk == at_least_the_batch.loss_chunk == 2 * 4 * n * vocab
    assert plain.activations - plans[(1, 1024)].activations == 4 * n * vocab + 8 * n - (2048 * 1536 * 2 + 8 * 2048)
    assert plain.total > plans[(1, 1024)].total + 1.5 * GiB


def test_more_tokens_or_rank_never_need_less_memory():
    for field, values in (("micro_batch_size", [1, 2, 3, 4, 8]), ("seq_len", [256, 512, 1024, 2048, 4096]),
                          ("lora_rank", [4, 8, 16, 64])):
        for checkpointing in (False, True):
            base = TrainingShape(gradient_checkpointing=checkpointing)
            totals = [plan_memory(QWEN, replace(base, **{field: v})).total for v in values]
            assert totals == sorted(totals) and len(set(totals)) == len(totals), (field, checkpointing)
    no_checkpointing = plan_memory(QWEN, TrainingShape(micro_batch_size=4))
    checkpointing = plan_memory(QWEN, TrainingShape(micro_batch_size=4, gradient_checkpointing=True))
    assert checkpointing.total < no_checkpointing.total / 5
