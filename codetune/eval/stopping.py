"""When to stop generating a completion: as soon as everything it is judged on has been written.

`model.generate` runs a batch until every row is done; a row is done at its end-of-sequence token
(generate's own rule) or when `CompletionStop` says so, which it checks after every step on the row's
new tokens decoded as text. A row that is done is padded by generate while the others go on, and
the call returns as soon as all rows are done, so a batch costs as many steps as its longest row.

Each row has its own rule and its own token cap:

* a **repo prompt** (scored): done once `codetune.eval.metrics.scored_prefix` holds, i.e. the
  completion has the lines that next-line exact match and chrF read; the metrics then score the
  completion exactly as they would score it at full length, since they read only that prefix.
  Its cap is `max_new_tokens`.
* a **language prompt** (shown, not scored): done at `sample_complete`, a blank line once the
  sample's first block has closed; its cap is the shorter `sample_tokens`.

Both rules read whole lines, so their verdict can only change when a line break is written: a row is
decoded (about 25 us for 64 tokens, 130 us for 512, with the tiny model's fast tokenizer) only at a step
whose new token holds a line break, or part of a multi-byte character that could be one; otherwise
a step costs one decode of that token (a few us), next to a forward pass of tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

Rule = Callable[[str], bool]
"""Whether a row's decoded new text is complete; its verdict may only change when a line break is written."""

# What str.splitlines splits at: the rules count lines as the metrics do.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def sample_complete(text: str) -> bool:
    """A language sample is complete at a blank line after its first block closed: after an unindented
    non-blank line that follows an indented one (Rust's closing `}`, Python's next top-level statement).

    The first line of `text` continues the prompt's line and does not open the block by itself; a line
    still being written (no line break yet) is not judged.
    """
    indented = closed = False
    for piece in text.splitlines(keepends=True):
        content = piece.splitlines()[0]
        if len(content) == len(piece):
            return False
        if not content.strip():
            if closed:
                return True
        elif content[0] in " \t":
            indented = True
        elif indented:
            closed = True
    return False


class CompletionStop(StoppingCriteria):
    """Per-row stopping for `model.generate`: row `i` is done once it has `caps[i]` new tokens, or once
    `rules[i]` holds for its new tokens decoded as text. `stopped_at[i]` is then its number of new
    tokens, and `reasons[i]` says why ("cap" or "complete"); rows generate itself ended (EOS) keep None.

    Args:
        tokenizer: Decodes the new tokens (special tokens skipped, as the completions are decoded).
        prompt_width: Width of the left-padded prompt batch: new tokens start at this column.
        rules: One completeness rule per row.
        caps: One token cap per row (generate's own `max_new_tokens` is their maximum).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, rules: Sequence[Rule],
                 caps: Sequence[int]) -> None:
        if len(rules) != len(caps):
            raise ValueError(f"{len(rules)} rules for {len(caps)} caps: one of each per row")
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.rules = list(rules)
        self.caps = list(caps)
        self.stopped_at: list[int | None] = [None] * len(rules)
        self.reasons: list[str | None] = [None] * len(rules)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        # One copy to the host a step (generate synchronises every step anyway), not one per row.
        new = input_ids[:, self.prompt_width:].tolist()
        eos = self.tokenizer.eos_token_id
        for i, row in enumerate(new):
            if self.stopped_at[i] is not None or eos in row:  # done, or ended by generate (then padded)
                continue
            if len(row) >= self.caps[i]:
                self._stop(i, len(row), "cap")
            elif self._may_break_a_line(row[-1]) and self.rules[i](self._text(row)):
                self._stop(i, len(row), "complete")
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _may_break_a_line(self, token: int) -> bool:
        # U+FFFD: a byte of a multi-byte character, decoded alone; U+0085 and U+2028 are multi-byte in UTF-8.
        piece = self._text([token])
        return "\ufffd" in piece or not LINE_BREAKS.isdisjoint(piece)

    def _stop(self, i: int, length: int, reason: str) -> None:
        self.stopped_at[i] = length
        self.reasons[i] = reason
