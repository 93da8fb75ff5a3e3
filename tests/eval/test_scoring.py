"""An eval's metrics from its completions: what syntax validity judges, and the metrics of a set that is missing."""

from __future__ import annotations

import math

import pytest

from codetune.eval.generation import Completion
from codetune.eval.prompts import RepoPrompt
from codetune.eval.scoring import (completion_metrics, judged_for_syntax, no_completion_metrics, perplexity,
                                   syntax_scorable)


def test_a_stopped_completion_is_judged_as_cut_on_its_scored_part():
    truth = "    x = 1\n    return x\n"
    # Stopped once complete, or run on past that: the same two lines are judged, as a cut text.
    assert judged_for_syntax(Completion("\n    x = 1\n", 6, False), truth) == ("\n    x = 1\n", True)
    assert judged_for_syntax(Completion("\n    x = 1\n    y = (\n", 12, False), truth) == ("\n    x = 1\n", True)
    # Ended before the scored part was complete: judged whole, and strictly when it ended with EOS.
    assert judged_for_syntax(Completion("\n    pass", 3, True), truth) == ("\n    pass", False)
    assert judged_for_syntax(Completion("\n    pass", 3, False), truth) == ("\n    pass", True)


def test_a_cut_completion_says_something_about_syntax_only_past_its_forgiven_lines():
    # The rule for cut code forgives the last two non-blank lines: with two or fewer nothing would be judged.
    assert not syntax_scorable("\n    x = 1\n\n    y = (\n", truncated=True)
    assert syntax_scorable("\n    x = 1\n    y = 2\n    z = (\n", truncated=True)
    assert syntax_scorable("\n    pass", truncated=False), "one that ended on its own is always judged"


def test_no_completions_no_figures():
    assert completion_metrics([], []) == no_completion_metrics() == {
        "next_line_exact_match": None, "chrf": None, "syntax_valid": None}
    assert perplexity(None) is None and perplexity(1.0) == pytest.approx(math.e)


def test_a_cut_one_line_completion_is_matched_but_too_short_to_judge_its_syntax():
    prompt = RepoPrompt("src/f.py", "python", "def f():\n", "    return 1\n", 1, "")
    metrics = completion_metrics([prompt], [Completion("\n    return 1\n", 5, False)])
    assert metrics["next_line_exact_match"] == 1.0 and metrics["syntax_valid"] is None
    # One that ended with EOS before its scored part was complete is judged whole, however short.
    ended = completion_metrics([prompt], [Completion("\n    pass", 3, True)])
    assert ended["next_line_exact_match"] == 0.0 and ended["syntax_valid"] == 1.0
