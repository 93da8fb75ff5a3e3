"""The base -> tuned table printed at the end of a fit, and the deltas the manifest records."""

from __future__ import annotations

from rich.console import Console

from codetune.eval.report import EVAL_METRICS, HIGHER, LOWER, change_cell, comparison_table, metric_deltas


def test_comparison_table_marks_improvements_and_reads_well():
    phase = {"base": {"perplexity": 2095.892723, "next_line_exact_match": 0.25, "chrf": 0.0630174, "syntax_valid": 0.5},
             "final": {"perplexity": 1705.265925, "next_line_exact_match": 0.243635, "chrf": 0.0126279,
                       "syntax_valid": 0.5}}
    console = Console(record=True, width=100)
    console.print(comparison_table(phase))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in console.export_text().splitlines() if line.count("│") == 5}
    # Rates with three decimals in every column, perplexity with four significant digits (-390.6268 as -391).
    assert rows["held-out perplexity"] == ["2,096", "1,705", "-391"]
    assert rows["next-line exact match"] == ["0.250", "0.244", "-0.006"]
    assert rows["completion chrF"] == ["0.063", "0.013", "-0.050"]
    assert rows["syntax-valid completions"] == ["0.500", "0.500", "0.000"]
    # Lower perplexity and higher scores are green, a drop in a score red.
    assert "green" in change_cell(-90.0, LOWER) and "green" in change_cell(0.2, HIGHER)
    assert "red" in change_cell(-0.1, HIGHER) and "red" in change_cell(5.0, LOWER)
    assert change_cell(None, LOWER) == "" and change_cell(0.0, HIGHER) == "0"
    assert change_cell(0.0, HIGHER, rate=True) == "0.000" and change_cell(0.2, HIGHER, rate=True) == "[green]+0.200[/]"


def test_metric_deltas_are_final_minus_base_for_every_eval_metric():
    base, final = {"perplexity": 10.0, "chrf": 0.25, "fim_chrf": None}, {"perplexity": 4.0, "chrf": 0.5}
    deltas = metric_deltas(base, final)
    assert list(deltas) == [key for key, _, _ in EVAL_METRICS]
    assert deltas["perplexity"] == -6.0 and deltas["chrf"] == 0.25 and deltas["fim_chrf"] is None
    assert metric_deltas(None, final) is None and metric_deltas(base, None) is None
