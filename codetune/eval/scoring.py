"""An eval's metrics from its completions: what `callbacks/generation_eval.py` reports for the base and each epoch.

`codetune.eval.metrics` defines each metric on plain strings and `codetune.eval.fim` the FIM ones; this module
applies them to the completions of one eval:

* perplexity from the mean held-out NLL;
* next-line exact match and chrF of the repo prompts' completions against the files' continuations, and
  syntax validity of what those two metrics read (`judged_for_syntax`): the scored prefix, judged as cut code,
  once the completion holds it; otherwise the whole completion, cut unless it ended with EOS. A cut
  completion is scored only with more than two non-blank lines (`syntax_scorable`), since the rule for cut
  code forgives its last two;
* the FIM metrics of the generated middles, each completion cut to its mask's lines (`generated_middle`).

A set that was not scored this eval (it could not be finished within the budget) has its metrics None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from codetune.eval.fim import FimPrompt, fim_chrf, fim_exact_match, fim_syntax_valid, generated_middle
from codetune.eval.metrics import (chrf, mean_next_line_exact_match, perplexity_from_loss, scored_prefix,
                                   syntax_validity_rate)
from codetune.eval.prompts import RepoPrompt

if TYPE_CHECKING:
    from codetune.eval.generation import Completion

def perplexity(mean_nll: float | None) -> float | None:
    """exp of the mean held-out NLL; None when there was none."""
    return None if mean_nll is None else perplexity_from_loss(mean_nll)


def completion_metrics(prompts: Sequence[RepoPrompt], completions: Sequence[Completion]) -> dict[str, float | None]:
    """Next-line exact match, chrF and syntax validity of the repo prompts' completions (None without any)."""
    if not completions:
        return no_completion_metrics()
    generated = [c.text for c in completions]
    truths = [p.continuation for p in prompts]
    judged = [judged_for_syntax(c, p.continuation) for p, c in zip(prompts, completions)]
    syntax = syntax_validity_rate((p.program(text), p.language, cut)
                                  for p, (text, cut) in zip(prompts, judged) if syntax_scorable(text, cut))
    return {"next_line_exact_match": mean_next_line_exact_match(generated, truths),
            "chrf": chrf(generated, truths), "syntax_valid": syntax}


def no_completion_metrics() -> dict[str, float | None]:
    return {"next_line_exact_match": None, "chrf": None, "syntax_valid": None}


def fim_metrics(prompts: Sequence[FimPrompt], completions: Sequence[Completion]) -> dict[str, float | None]:
    """The FIM metrics of the generated middles: each completion cut to its mask's lines (or whole, when it
    ended or hit its cap first)."""
    middles = [generated_middle(c.text, p.middle) for p, c in zip(prompts, completions)]
    return {"fim_exact_match": fim_exact_match(prompts, middles), "fim_chrf": fim_chrf(prompts, middles),
            "fim_syntax_valid": fim_syntax_valid(prompts, middles)}


def no_fim_metrics() -> dict[str, float | None]:
    return {"fim_exact_match": None, "fim_chrf": None, "fim_syntax_valid": None}


def judged_for_syntax(completion: Completion, truth: str) -> tuple[str, bool]:
    """(text, cut) that syntax validity judges: the scored prefix, a cut text, once the completion holds it
    (whether generation went on past it or not); otherwise the whole completion, cut unless it ended with EOS."""
    prefix = scored_prefix(completion.text, truth)
    return (prefix, True) if prefix is not None else (completion.text, not completion.eos)


def syntax_scorable(completion: str, truncated: bool) -> bool:
    """Whether a completion says anything about syntax. The rule for cut-off code forgives its last
    two non-blank lines (see `syntax_valid`), so a cut-off completion is scored only when it has
    more lines than that; one that ended on its own (EOS) is always scored, strictly."""
    return not truncated or sum(1 for line in completion.splitlines() if line.strip()) > 2
