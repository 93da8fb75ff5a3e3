"""The generation engine: prompts' token ids, `model.generate` with per-row stopping, and the completions decoded.

The epoch-end evaluation (`callbacks/generation_eval.py`) and `codetune generate` both generate through
`generate`: rows of prompt ids, left-padded into one batch (generation continues at the right end of every
row), each row with its own completeness rule and token cap (`codetune.eval.stopping.CompletionStop`). A row
ends at its end-of-sequence token, once its rule holds, or at its cap; its `Completion` is the text of its new
tokens up to there (special tokens skipped), their number (EOS included) and whether it ended with EOS. The
model runs in eval mode (its mode is restored after) and without gradients; the evaluation passes the trainer's
forward context, so that it generates under training's autocast.

The evaluation sends its requests as text, tokenized as training tokenized files (`text_ids`: no special
tokens added; a FIM sentinel's text becomes its id), in batches. `codetune generate` sends one row at a time,
so no padding perturbs its numbers, and reseeds the sampling before each.

What each eval request is, is built here too: a repo prompt is complete once it holds what its metrics read
(`codetune.eval.metrics.scored_prefix`), a FIM prompt once it holds its mask's lines (a line mask at a smaller
cap, `FIM_LINE_TOKENS`), a language sample at the end of its first block (`codetune.eval.stopping`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteriaList

from codetune.data.fim import FimTokens
from codetune.data.tokens import pad_token_id
from codetune.eval.fim import FimPrompt, holds_middle
from codetune.eval.metrics import scored_prefix
from codetune.eval.prompts import RepoPrompt
from codetune.eval.stopping import CompletionStop, Rule, sample_complete

# A line infill stops at its first line; this caps one that never writes a line break (nor EOS).
FIM_LINE_TOKENS = 48


class Request(NamedTuple):
    """One generation: the model input, when its completion is complete, and its token cap."""

    text: str
    rule: Rule
    cap: int


class Completion(NamedTuple):
    """What the model wrote for one request: the text, its new tokens (EOS included) and whether it ended
    with EOS (False when it was cut: at its token cap, or stopped once complete)."""

    text: str
    new_tokens: int
    eos: bool


class Generated(NamedTuple):
    """A batch's completions, and why each row stopped: "complete" (its rule held), "cap", or None (it ended
    with EOS)."""

    completions: list[Completion]
    reasons: list[str | None]


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen: greedily (reproducible), or sampled at `temperature` from the `top_p`
    nucleus when `do_sample`. What is not set here (repetition penalty, top-k...) is the model's generation
    config's."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        """`model.generate`'s decoding arguments (the sampling ones only when sampling)."""
        sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
        return {"do_sample": self.do_sample, **sampling}


def never(text: str) -> bool:
    """The rule of a row that runs to its EOS or its cap."""
    return False


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids as training tokenized files: no special tokens added (a sentinel's text is its id)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def generate_requests(model: Any, tokenizer: PreTrainedTokenizerBase, requests: Sequence[Request],
                      decoding: Decoding, device: torch.device,
                      context: AbstractContextManager | None = None) -> list[Completion]:
    """A completion per request, all in one batch (`generate`)."""
    rows = text_ids(tokenizer, [r.text for r in requests])
    return generate(model, tokenizer, rows, [r.rule for r in requests], [r.cap for r in requests], decoding,
                    device, context).completions


@torch.no_grad()
def generate(model: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]], rules: Sequence[Rule],
             caps: Sequence[int], decoding: Decoding, device: torch.device,
             context: AbstractContextManager | None = None) -> Generated:
    """Generate after each row of prompt ids until its EOS, its rule or its cap, in one left-padded batch on
    `device`, in eval mode, within `context` (e.g. the trainer's autocast)."""
    ids, mask = left_padded(rows, pad_token_id(tokenizer))
    ids, mask = ids.to(device), mask.to(device)
    stop = CompletionStop(tokenizer, ids.shape[1], rules, caps)
    was_training = model.training
    model.eval()
    try:
        with context if context is not None else nullcontext():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(stop.caps),
                                 stopping_criteria=StoppingCriteriaList([stop]), pad_token_id=pad_token_id(tokenizer),
                                 **decoding.generate_kwargs())
    finally:
        model.train(was_training)
    completions = [completion_of(tokenizer, row, stopped_at)
                   for row, stopped_at in zip(out[:, ids.shape[1]:], stop.stopped_at)]
    return Generated(completions, list(stop.reasons))


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left (generation continues at the right end of every row) and the mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def completion_of(tokenizer: PreTrainedTokenizerBase, row: torch.Tensor, stopped_at: int | None) -> Completion:
    """One generated row (new tokens only, padded once done): its text up to where it ended."""
    eos = tokenizer.eos_token_id
    ends = (row == eos).nonzero() if stopped_at is None and eos is not None else row[:0]
    length = stopped_at if stopped_at is not None else int(ends[0]) + 1 if len(ends) else len(row)
    return Completion(tokenizer.decode(row[:length], skip_special_tokens=True), length, len(ends) > 0)


# -- the evaluation's requests ---------------------------------------------------------------------------------


def repo_request(prompt: RepoPrompt, cap: int, header: str = "") -> Request:
    """A repo prompt after `header` (a file's header, when training files start with one and the prompt starts the
    file), complete once it holds the part of the continuation its metrics read."""
    return Request(header + prompt.model_input, partial(holds_scored_prefix, truth=prompt.continuation), cap)


def fim_request(prompt: FimPrompt, tokens: FimTokens, header: str, max_new_tokens: int) -> Request:
    """An infill request in the tokenizer's FIM format after `header` (the file's header, when training files start
    with one); it stops once it holds the masked lines (a line mask, at a smaller cap: a line is short)."""
    cap = min(max_new_tokens, FIM_LINE_TOKENS) if prompt.kind == "line" else max_new_tokens
    return Request(tokens.psm_prompt(prompt.prefix, prompt.suffix, header),
                   partial(holds_middle, truth=prompt.middle), cap)


def language_request(text: str, cap: int) -> Request:
    """A language prompt (shown, not scored), complete at the end of its first block."""
    return Request(text, sample_complete, cap)


def holds_scored_prefix(text: str, truth: str) -> bool:
    """Whether a completion holds all that next-line exact match and chrF read of it."""
    return scored_prefix(text, truth) is not None
