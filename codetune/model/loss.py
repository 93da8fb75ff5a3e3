"""Causal-LM cross-entropy computed in chunks, so the full logits never exist at once.

A code model's vocabulary is large: Qwen2.5-Coder has 151,936 entries, so the logits of one
4 x 4096 micro-batch are 16,384 x 151,936 values, 5 GB in bf16 and 10 GB once upcast to fp32 for
the cross-entropy. The plain loss keeps even more alive: autograd saves the fp32 log-softmax for
backward, and backward materialises two more fp32 tensors of that size (the gradient of the
log-probabilities and the gradient of the logits). On a small GPU that is the largest single
allocation of a LoRA step, far larger than the model's activations.

`causal_lm_loss_sum` splits the work instead:

1. Shift once, cheaply. Position t predicts ``labels[t + 1]``; we append one ``IGNORE_INDEX``
   column to ``labels[:, 1:]`` so the targets line up with every position of ``hidden`` (the last
   position of each row gets no target). ``hidden`` then flattens to ``[B * T, H]`` as a view,
   with no copy of the shifted hidden states.
2. Chunk along the flattened token axis. ``chunk_size`` counts tokens of the whole micro-batch,
   not positions of one row, so the peak is ``chunk_size x vocab`` whatever the batch size, and a
   chunk may span the end of one row and the start of the next (which is harmless: every token's
   loss is independent once the targets are shifted).
3. Recompute, don't store. Each chunk's ``head -> float -> cross-entropy sum`` runs under
   non-reentrant activation checkpointing: forward keeps only the chunk's scalar loss, and
   backward recomputes that one chunk's logits, back-propagates through them, and frees them
   before the next chunk. The extra cost is one more head matmul per token (about a third more
   work in the head); the extra memory is about three fp32 buffers of ``chunk_size x vocab``
   (log-probabilities, their gradient, the logits' gradient), instead of three of ``B*T x vocab``.
4. Skip chunks without targets. Padding and file-boundary masks can leave whole chunks without a
   target; their loss is exactly zero and so is their gradient, so they are not run at all. The
   per-chunk target counts come to the host in one transfer (one device sync per call).

The result is ``(sum of token losses in fp32, number of target tokens)`` rather than a mean, so a
caller accumulating micro-batches can divide by the total target count of the optimizer step;
averaging per-micro-batch means would weight short (heavily masked) micro-batches too much.

With ``chunk_size`` None, or at least ``B * T`` (a single chunk anyway), the plain path runs:
one head call on the shifted hidden states, no checkpointing. Both paths give the same loss and
gradients to float tolerance (the chunked one sums partial sums in a different order).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from codetune.data.packing import IGNORE_INDEX



def causal_lm_loss_sum(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    chunk_size: int | None = 1024,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropies and the number of target tokens.

    Args:
        hidden: ``[B, T, H]`` final hidden states, after the final norm (any float dtype).
        head: the output projection, e.g. ``model.lm_head`` (a peft LoRA-wrapped Linear works);
            it is called on ``[n, H]`` slices of ``hidden``.
        labels: ``[B, T]`` token ids aligned with the inputs (HF convention): the loss predicts
            ``labels[:, 1:]`` from ``hidden[:, :-1]``; ``IGNORE_INDEX`` positions are not targets.
        chunk_size: tokens of the flattened micro-batch per chunk (``--model.loss_chunk_size``);
            None, or at least ``B * T``, computes the loss in one piece.

    Returns:
        ``(loss_sum, n_targets)``: a 0-dim fp32 tensor attached to the graph of ``hidden`` and
        ``head``, and a 0-dim int64 tensor. Both are 0 when no position is a target.

    Raises:
        ValueError: if ``chunk_size`` is not a positive int or None, or the shapes disagree.
    """
    _check_chunk_size(chunk_size)
    _check_shapes(hidden, labels)
    n_tokens = hidden.shape[0] * hidden.shape[1]
    if chunk_size is None or chunk_size >= n_tokens:
        return _plain_loss_sum(hidden, head, labels)
    return _chunked_loss_sum(hidden, head, labels, chunk_size)


def _check_chunk_size(chunk_size: object) -> None:
    # bool is an int subclass; `True` as a chunk size is a config mistake, not 1.
    if chunk_size is None or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        return
    raise ValueError(
        f"--model.loss_chunk_size must be a positive integer (tokens per loss chunk) or null "
        f"(no chunking), got {chunk_size!r}. Use e.g. 1024; smaller values use less memory."
    )


def _check_shapes(hidden: Tensor, labels: Tensor) -> None:
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"causal_lm_loss_sum expects hidden [B, T, H] and labels [B, T]; "
            f"got hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}."
        )


def _plain_loss_sum(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    targets = labels[:, 1:].flatten()
    # Slice before the head: the last position has no target, so its logits are never needed.
    loss_sum = _token_ce_sum(head, hidden[:, :-1].flatten(0, 1), targets)
    return loss_sum, (targets != IGNORE_INDEX).sum()


def _chunked_loss_sum(
    hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    targets = shift_targets(labels).flatten()
    chunk_counts = _targets_per_chunk(targets, chunk_size)
    # split() has one backward node that concatenates the chunk grads once, where slicing would
    # allocate a full-size zero gradient per chunk.
    hidden_chunks = hidden.flatten(0, 1).split(chunk_size)
    target_chunks = targets.split(chunk_size)
    todo = [i for i, count in enumerate(chunk_counts) if count > 0]
    # With no target at all, still run one chunk (its loss is exactly 0) so the result stays on
    # the graph: backward() works and head's parameters get zero gradients, as in the plain path.
    chunk_losses = [
        checkpoint(_token_ce_sum, head, hidden_chunks[i], target_chunks[i], use_reentrant=False)
        for i in todo or [0]
    ]
    loss_sum = torch.stack(chunk_losses).sum()
    n_targets = torch.tensor(sum(chunk_counts), dtype=torch.int64, device=labels.device)
    return loss_sum, n_targets


def shift_targets(labels: Tensor) -> Tensor:
    """``[B, T]`` targets for each position: ``labels[:, t + 1]``, and IGNORE_INDEX at the end."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _targets_per_chunk(targets: Tensor, chunk_size: int) -> list[int]:
    is_target = (targets != IGNORE_INDEX).to(torch.int64)
    n_chunks = -(-targets.numel() // chunk_size)
    padded = F.pad(is_target, (0, n_chunks * chunk_size - targets.numel()))
    # One host transfer for all chunks rather than a sync per chunk.
    return padded.view(n_chunks, chunk_size).sum(dim=1).tolist()


def _token_ce_sum(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    # Upcast before the softmax, as HF does: bf16 log-probabilities lose the small differences
    # between large logits that the loss is made of.
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
