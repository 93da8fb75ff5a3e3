"""The eval report's vocabulary: which metrics the generation eval measures, which direction is better, and how a
value and a change are written. The generation eval's table (`comparison_table`, printed at the end of a fit by
`callbacks/generation_eval.py`) and `codetune compare` both speak it, so a figure reads the same in the console at
the end of a fit and in a comparison of runs.

Only the standard library and rich: `compare` imports it and starts without torch.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

MISSING = "—"
LOWER, HIGHER = "lower", "higher"
# The generation eval's metrics (manifest key, label, better).
EVAL_METRICS = (
    ("perplexity", "held-out perplexity", LOWER),
    ("next_line_exact_match", "next-line exact match", HIGHER),
    ("chrf", "completion chrF", HIGHER),
    ("syntax_valid", "syntax-valid completions", HIGHER),
    ("fim_exact_match", "FIM line exact match", HIGHER),
    ("fim_chrf", "FIM block chrF", HIGHER),
    ("fim_syntax_valid", "FIM syntax-valid files", HIGHER),
)
# The eval metrics that are rates on 0..1: shown with three decimals in every column (0.063 -> 0.013, -0.050).
RATE_METRICS = frozenset({"next_line_exact_match", "chrf", "syntax_valid", "fim_exact_match", "fim_chrf",
                          "fim_syntax_valid"})


def comparison_table(phase: dict[str, Any]) -> Table:
    """Rich table of the manifest's `phase_5_evaluation`: metric, base, tuned, change (with whether the change is an
    improvement)."""
    table = Table(title="Evaluation on held-out files: base -> tuned", title_justify="left")
    for name, justify in (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    base, final = phase["base"] or {}, phase["final"] or {}
    for key, label, better in EVAL_METRICS:
        b, f = base.get(key), final.get(key)
        rate = key in RATE_METRICS
        table.add_row(label, format_value(b, rate=rate), format_value(f, rate=rate),
                      change_cell(delta(f, b), better, rate=rate))
    return table


def change_cell(change: float | None, better: str, rate: bool = False) -> str:
    """The change, green when it is an improvement in a metric whose `better` direction is given; a `rate`
    (0..1) with three decimals, as its values are shown."""
    if change is None:
        return ""
    text = format_change(change, rate=rate)
    if change == 0:
        return text
    return f"[{'green' if verdict(change, better) == 'better' else 'red'}]{text}[/]"


def metric_deltas(base: dict[str, Any] | None, final: dict[str, Any] | None) -> dict[str, float | None] | None:
    """final - base of every eval metric (None where either is missing); None without both evals."""
    if not base or not final:
        return None
    return {k: delta(final.get(k), base.get(k)) for k, _, _ in EVAL_METRICS}


def delta(value: Any, baseline: Any) -> int | float | None:
    """value - baseline for two finite numbers (booleans are not numbers here), else None."""
    if not (is_number(value) and is_number(baseline)):
        return None
    return value - baseline


def verdict(change: int | float | None, better: str | None) -> str | None:
    """Whether a change is "better", "worse" or "same" in a row with a direction; None without either."""
    if change is None or better is None:
        return None
    if change == 0:
        return "same"
    return "better" if (change > 0) == (better == HIGHER) else "worse"


def is_number(value: Any) -> bool:
    """A finite int or float; booleans are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(value: Any, rate: bool = False) -> str:
    """A value as a person reads it: integers with thousands separators, a `rate` (0..1) with three decimals,
    other numbers with four significant digits (whole numbers from 1,000 up), never in exponent notation."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if rate:
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _significant(value, 4, sign="")


def format_change(change: int | float, rate: bool = False) -> str:
    """A change with its sign: as `format_value` shows the values, with three significant digits for
    numbers below 1,000; 0 has no sign."""
    if change == 0:
        return format_value(change, rate=rate)
    if rate:
        return f"{change:+.3f}"
    if isinstance(change, int):
        return f"{change:+,}"
    return _significant(change, 3, sign="+")


def _significant(value: float, digits: int, sign: str) -> str:
    """`value` to `digits` significant digits in fixed-point notation (whole from 1,000 up, with separators)."""
    if not math.isfinite(value):
        return f"{value:{sign}}"
    if value == 0:
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    if abs(round(value, decimals)) >= 1000:  # 999.96 rounds up to 1,000
        return f"{value:{sign},.0f}"
    # Fixed-point, then trailing zeros dropped: 2.730 reads as 2.73, as the %g spelling did.
    text = f"{value:{sign}.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
