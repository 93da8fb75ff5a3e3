"""Bytes of one training step on top of what the run holds: autocast's copies of the LoRA weights, the
activations autograd saves, and the largest of the step's transients. Notation as in `codetune.memory.estimate`.

- ``autocast_copies`` (16-bit only): autocast casts each fp32 LoRA weight to 16-bit at its first
  use and caches the copy until its region ends, which is after the optimizer step: ``p`` bytes
  per LoRA value, once per step whatever the micro-batch.
- ``activations``: what autograd (and the checkpoint closures) hold at the end of one micro-batch's
  forward. Per decoder layer and token (a layer whose input requires grad), LoRA on every
  projection:

  * each RMSNorm: its input upcast to fp32 and the rsqrt, ``4 h + 4`` (x2 per layer);
  * the adapters on Linears that share an input of width ``n`` (q/k/v; o; gate/up; down), which
    see it in the compute dtype: with dropout 0, A saves the shared input once, ``p n``, and B
    saves each A's output, ``p r`` per adapter. With dropout > 0 each adapter keeps its own
    dropout mask (bool on CUDA, 1 byte; on CPU the scaled noise, ``p`` bytes) and dropout output,
    ``(mask + p) n + p r``. Without dropout o_proj's input is SDPA's output and down_proj's the MLP
    product, both already counted, so they add only ``p r``;
  * the gated MLP: gate (SiLU's input), SiLU's output and up (the product's inputs), ``3 i p``;
  * attention, ``sdpa`` without a mask (flash kernel on CUDA, GQA native): q, k, v, output and the
    fp32 log-sum-exp, ``(2 nh + 2 nkv) d p + 4 nh``, no ``[s, s]`` tensor. Where flash cannot run (compute
    capability below 8.0, or fp32; `codetune.model.kernels`) the memory-efficient kernel does, with k and v
    repeated to ``nh`` heads: ``4 nh d p + 4 nh`` (`TrainingShape.unmasked_kernel`). Packed windows (the
    position ids restart at each file, so transformers builds a block-diagonal mask) change that:
    k and v are repeated to ``nh`` heads and SDPA converts the boolean mask to a ``[b, 1, s, s]``
    compute-dtype bias in *every* layer and saves it: ``4 nh d p + 4 nh + s p``.
    ``flash_attention_2``: like unmasked sdpa (packing goes through varlen, without a mask).
    ``eager``: q and the repeated k, v, ``3 nh d p``, plus the ``[b, nh, s, s]`` attention
    probabilities in fp32 and their compute-dtype copy, ``nh s (4 + p)`` (``4 nh s`` in fp32).

  The first layer is cheaper: its input (the frozen embedding's output) does not require grad, so
  its first RMSNorm and the q/k/v dropout masks are not saved. Once per step: the rotary cos/sin
  ``2 T d p``, the final RMSNorm ``(4 h + 4) T``, and what the loss keeps: chunked, its inputs
  (the final hidden states ``T h p`` and int64 targets ``8 T``); plain, the fp32 log-probabilities
  ``4 n V`` and targets ``8 n`` (``n = b (s - 1)``).

  With gradient checkpointing (non-reentrant, per layer) a layer keeps only its input, ``T h p``
  per layer, plus the step-wide tensors above and the ones the checkpoint closures hold (cos/sin,
  and the ``[b, 1, s, s]`` boolean packing mask, ``b s^2`` bytes; eager: its float mask).

On top of those comes the largest of four transients, moments that never overlap:

- ``loss_chunk``: `causal_lm_loss_sum` runs one chunk of ``c = loss_chunk_size`` tokens at a time
  (``c`` counts tokens of the whole micro-batch, not of one row). Backward through a chunk holds
  three fp32 ``[c, V]`` buffers at once (the log-probabilities, their gradient, the logits'
  gradient): ``12 c V``; the gradients of the chunks done so far wait to be joined, ``(T - c) h p``.
  The plain path (``loss_chunk_size`` None or >= T) saved its log-probabilities already, so
  backward adds ``8 n V``. A trainable ``lm_head`` adds its weight gradient's buffer, ``V h p``.
- ``norm_backward``: the final RMSNorm's backward holds five fp32 ``[T, h]`` buffers at once
  (``20 h``), once the loss's saved tensors are gone.
- ``layer_backward``: backward through the last decoder layer, once the loss's and the final norm's
  saved tensors are freed. Its MLP's backward: one incoming ``[T, h]`` gradient and three ``[T, i]``
  ones (the product's, and the two it gives SiLU's output and up), ``h p + 3 i p``, minus the down
  adapter's saved tensors, freed by then. With checkpointing, backward first re-runs the layer's
  forward, which brings back one layer's activations (in fp32 its first norm's input is the
  checkpointed input itself), and the larger moment may be the end of that re-run: the final
  norm's two incoming gradients (``2 h p``), and held but not saved, the MLP input and, in 16-bit,
  the residual (``h p`` each), the MLP product (``i p``, unless LoRA saved it) and the down
  projection's base output (``h p``).
- ``forward_transient`` (without checkpointing): at the end of the last layer's forward, alive but
  not saved: the embeddings and the attention mask (held by the model's forward), the layer's
  input and residual (16-bit only; fp32 norms save them), the MLP input, the product (unless LoRA
  saved it), the down projection's output, and LoRA's two ``[T, h]`` outputs (B's and its scaled
  copy, ``p`` each); minus the final norm's and the loss's saved tensors, not made yet.
"""

from __future__ import annotations

from codetune.memory.persistent import lora_parameter_count
from codetune.memory.shapes import FP32, INT64, ModelShape, TrainingShape

# Log-probabilities, their gradient and the logits' gradient, all fp32, during a chunk's backward.
LOSS_FP32_BUFFERS = 3


def autocast_copy_bytes(model: ModelShape, training: TrainingShape) -> int:
    """The 16-bit copies autocast makes of the fp32 LoRA weights (0 with an fp32 compute dtype).

    Autocast casts a trainable fp32 leaf once per region and caches the copy until the region ends,
    which Lightning's precision plugin puts around the whole training step (every micro-batch and
    the optimizer step): ``p`` bytes per LoRA value. Full copies (`modules_to_save`) are in the
    compute dtype already and need none.
    """
    if training.compute_dtype_bytes == FP32:
        return 0
    lora = lora_parameter_count(model, training.lora_rank, training.lora_target_modules)
    return lora * training.compute_dtype_bytes


# -- activations ---------------------------------------------------------------------------------


def saved_activation_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Bytes that autograd (and the checkpoint closures) hold at the end of one micro-batch's forward."""
    t, h, p = training.tokens, model.hidden_size, training.compute_dtype_bytes
    rope = 2 * t * model.head_size * p
    final_norm = t * _rms_norm_bytes(h)
    shared = rope + final_norm + _loss_saved_bytes(model, training)
    if training.gradient_checkpointing:
        return shared + model.num_hidden_layers * t * h * p + _closure_mask_bytes(training, p)
    embedding_trainable = "embed_tokens" in training.modules_to_save
    first = _layer_bytes_per_token(model, training, input_requires_grad=embedding_trainable)
    rest = _layer_bytes_per_token(model, training, input_requires_grad=True)
    return shared + t * (first + (model.num_hidden_layers - 1) * rest)


def layer_activation_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Bytes one decoder layer saves for backward (input requiring grad), for the whole micro-batch."""
    return training.tokens * _layer_bytes_per_token(model, training, input_requires_grad=True)


def _layer_bytes_per_token(model: ModelShape, training: TrainingShape, input_requires_grad: bool) -> int:
    """Saved bytes per token of one decoder layer, following which tensors require grad."""
    targets = set(training.lora_target_modules)
    shapes = model.projections()
    h, i, p = model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    x_grad = input_requires_grad
    total = _rms_norm_bytes(h) if x_grad else 0
    total += _lora_group_bytes(shapes, ("q_proj", "k_proj", "v_proj"), targets, training, x_grad)
    attention_grad = x_grad or bool(targets & {"q_proj", "k_proj", "v_proj"})
    total += _attention_bytes(model, training) if attention_grad else 0
    total += _lora_group_bytes(shapes, ("o_proj",), targets, training, attention_grad)
    if _o_proj_input_is_attention_output(training) and "o_proj" in targets and attention_grad:
        # SDPA's output is laid out [b, s, heads, d], so o_proj's input is the very tensor SDPA saved.
        total -= p * model.num_attention_heads * model.head_size
    residual_grad = x_grad or attention_grad or "o_proj" in targets
    total += _rms_norm_bytes(h) if residual_grad else 0
    total += _lora_group_bytes(shapes, ("gate_proj", "up_proj"), targets, training, residual_grad)
    mlp_grad = residual_grad or bool(targets & {"gate_proj", "up_proj"})
    # SiLU saves gate; the product saves SiLU(gate) and up.
    total += 3 * i * p if mlp_grad else 0
    total += _lora_group_bytes(shapes, ("down_proj",), targets, training, mlp_grad)
    return total


def _lora_group_bytes(shapes: dict[str, tuple[int, int, bool]], group: tuple[str, ...], targets: set[str],
                      training: TrainingShape, input_requires_grad: bool) -> int:
    """Per-token bytes the adapters on Linears sharing one input save.

    The adapters see their input as is, in the compute dtype (fp32, or 16-bit under autocast with peft's
    input cast off), and A's output is in that dtype too.
    """
    adapted = [name for name in group if name in targets]
    if not adapted:
        return 0
    n_in, r, p = shapes[adapted[0]][0], training.lora_rank, training.compute_dtype_bytes
    lora_out = len(adapted) * p * r
    if training.lora_dropout > 0:
        mask = _dropout_mask_bytes(training) if input_requires_grad else 0
        return len(adapted) * (mask + p) * n_in + lora_out
    # No dropout: every A saves the one shared input tensor.
    return p * n_in + lora_out


def _dropout_mask_bytes(training: TrainingShape) -> int:
    # CUDA's fused dropout keeps a bool mask; the CPU kernel keeps its scaled noise, in the input's dtype.
    return 1 if training.device == "cuda" else training.compute_dtype_bytes


def _attention_bytes(model: ModelShape, training: TrainingShape) -> int:
    nh, nkv, d = model.num_attention_heads, model.num_key_value_heads, model.head_size
    p, s = training.compute_dtype_bytes, training.seq_len
    lse = FP32 * nh
    if training.attn_implementation == "eager":
        probabilities = nh * s * (FP32 if p == FP32 else FP32 + p)
        return 3 * nh * d * p + probabilities
    if training.attn_implementation == "sdpa" and training.packed_windows:
        # repeat_kv'd k and v, and the per-layer [b, 1, s, s] bias SDPA makes from the boolean mask.
        return 4 * nh * d * p + lse + s * p
    if training.attn_implementation == "sdpa" and training.unmasked_kernel == "efficient":
        # Memory-efficient attention takes no grouped-query attention: k and v repeated to the query heads.
        return 4 * nh * d * p + lse
    return (2 * nh + 2 * nkv) * d * p + lse


def _o_proj_input_is_attention_output(training: TrainingShape) -> bool:
    # Without dropout o_proj's adapter saves its input as is, and sdpa/flash saved that very tensor.
    return training.lora_dropout == 0 and training.attn_implementation != "eager"


def _lora_saves_product(training: TrainingShape) -> bool:
    # Without dropout down_proj's adapter saves the MLP product itself: it is an activation, not a transient.
    return training.lora_dropout == 0 and "down_proj" in training.lora_target_modules


def _rms_norm_bytes(hidden: int) -> int:
    # The fp32 upcast of the input (the input itself when it is fp32) and one fp32 rsqrt per token.
    return FP32 * hidden + FP32


def _loss_saved_bytes(model: ModelShape, training: TrainingShape) -> int:
    """What the loss keeps for backward: chunked, the final hidden states and the shifted int64 targets
    (inputs of its checkpoints); plain, the fp32 log-probabilities and the targets."""
    t, n = training.tokens, _loss_tokens(training)
    if _chunked_loss(training):
        return t * model.hidden_size * training.compute_dtype_bytes + INT64 * t
    return FP32 * n * model.vocab_size + INT64 * n


def _closure_mask_bytes(training: TrainingShape, p: int) -> int:
    """The step-wide attention mask that checkpointed layers keep alive (their keyword arguments)."""
    b, s = training.micro_batch_size, training.seq_len
    if training.attn_implementation == "eager":
        return b * s * s * p
    if training.attn_implementation == "sdpa" and training.packed_windows:
        return b * s * s
    return 0


def _chunked_loss(training: TrainingShape) -> bool:
    """Whether `causal_lm_loss_sum` takes its chunked path (else one plain head call)."""
    return training.loss_chunk_size is not None and training.loss_chunk_size < training.tokens


def _loss_tokens(training: TrainingShape) -> int:
    """Tokens in the loss's largest head call: one chunk, or all shifted positions for the plain path."""
    if _chunked_loss(training):
        return training.loss_chunk_size
    return training.micro_batch_size * (training.seq_len - 1)


def loss_chunk_bytes(model: ModelShape, training: TrainingShape) -> int:
    """The loss's logits buffers on top of the activations at its backward peak.

    Chunked: three fp32 ``[c, V]`` buffers, none of them saved, ``12 c V``, plus the gradients of
    the chunks already done, which wait for the split's backward to join them, ``(T - c) h p``.
    Plain: the fp32 log-probabilities are saved (so in the activations already); backward adds two
    more, ``8 n V``. A trainable ``lm_head`` adds its weight gradient's accumulation buffer, ``V h p``.
    """
    n, h, p = _loss_tokens(training), model.hidden_size, training.compute_dtype_bytes
    if _chunked_loss(training):
        logits = LOSS_FP32_BUFFERS * FP32 * n * model.vocab_size + (training.tokens - n) * h * p
    else:
        logits = (LOSS_FP32_BUFFERS - 1) * FP32 * n * model.vocab_size
    head_grad = model.vocab_size * h * p if "lm_head" in training.modules_to_save else 0
    return logits + head_grad


def layer_backward_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations while backward runs through the last decoder layer.

    With checkpointing, backward first re-runs the layer's forward, which brings back one layer's
    activations; the peak is then the larger of the end of that re-run and the MLP's backward.
    Without checkpointing only the MLP's backward remains (the layer's activations are counted).
    The loss's and the final norm's saved tensors are freed by then.
    """
    t, h, i, p = training.tokens, model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    # In the MLP's backward the down adapter's saved tensors are gone, one incoming [T, h] gradient is left, and
    # three [T, i] gradients are alive: the product's (base plus LoRA) and the two it gives SiLU's output and up.
    down_saved = _lora_group_bytes(model.projections(), ("down_proj",), set(training.lora_target_modules), training,
                                   input_requires_grad=True)
    mlp_backward = h * p + 3 * i * p - down_saved
    freed = _loss_saved_bytes(model, training) + t * _rms_norm_bytes(h)
    if not training.gradient_checkpointing:
        return max(0, t * mlp_backward - freed)
    layer = layer_activation_bytes(model, training)
    if p == FP32:
        # The first RMSNorm saves its input as is, and that is the checkpoint's input, counted already.
        layer -= t * FP32 * h
    # The gradient buffers the final RMSNorm's backward left: two [T, h] in the compute dtype (measured).
    incoming = 2 * h * p
    # Held by the layer's frames, not saved: the MLP input, and the residual when the norm saved an fp32 copy.
    frames = h * p + (h * p if p != FP32 else 0)
    product = 0 if _lora_saves_product(training) else i * p
    down_output = h * p  # peft's 4-bit path clones it, but the original is freed at once
    end_of_rerun = incoming + frames + product + down_output
    return max(0, layer + t * max(end_of_rerun, mlp_backward) - freed)


def forward_transient_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations at the end of the last layer's forward (0 with checkpointing).

    Alive but not saved at that moment: the embeddings and the attention mask (held by the model's
    forward), the layer's input, residual and MLP input (held by frames; in fp32 the norms save the
    first two), the MLP product (unless down_proj's adapter saved it), the down projection's base
    output and two ``[T, h]`` LoRA outputs in the compute dtype (B's output and its scaled copy).
    Not yet alive: the final norm's and the loss's saved tensors.
    """
    if training.gradient_checkpointing:
        return 0  # every checkpointed layer's forward is smaller than the re-run of one in backward
    t, h, i, p = training.tokens, model.hidden_size, model.intermediate_size, training.compute_dtype_bytes
    # The embeddings, the layer's input and residual (saved as is by fp32 norms), the MLP input.
    held = h * p + (2 * h * p if p != FP32 else 0) + h * p
    # The MLP product, unless down_proj's adapter saved it (no dropout).
    product = 0 if _lora_saves_product(training) else i * p
    # LoRA B's output and its scaled copy, in the compute dtype.
    product += 2 * p * h if "down_proj" in training.lora_target_modules else 0
    down_output = h * p
    not_yet = _loss_saved_bytes(model, training) + t * _rms_norm_bytes(h)
    excess = t * (held + product + down_output) + _closure_mask_bytes(training, p) - not_yet
    return max(0, excess)


def norm_backward_bytes(model: ModelShape, training: TrainingShape) -> int:
    """Excess over the activations while the final RMSNorm runs its backward.

    Five fp32 ``[T, h]`` buffers are alive at once (the upcast input's gradient through the rsqrt,
    the mean's expanded gradient, and pow's three: its ``x^1``, twice that, and the product with the
    incoming gradient), and the loss's saved tensors are freed by then. Only a small loss chunk
    lets it be the peak.
    """
    return max(0, training.tokens * 5 * FP32 * model.hidden_size - _loss_saved_bytes(model, training))

