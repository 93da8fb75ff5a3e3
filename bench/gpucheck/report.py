"""The check's output: a small table per part on stdout as it ends, and with `--out` the JSON of every row so far,
rewritten whole each time, so a command stopped by its time limit still leaves the sections it finished."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Budget
from .row import FAIL, INCONCLUSIVE, PASS, Row
from .settings import SECTION_TITLES


def render(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name in ("section", "check", "status", "measured", "criterion"):
        table.add_column(name, overflow="fold")
    colours = {PASS: "green", FAIL: "red", INCONCLUSIVE: "yellow"}
    for row in rows:
        colour = colours.get(row.status, "dim")
        section = f"{row.section} {SECTION_TITLES.get(row.section, '')}".strip()
        table.add_row(section, row.check, f"[{colour}]{row.status}[/]", row.measured, row.criterion)
    Console(width=int(os.environ.get("COLUMNS", "200"))).print(table)
    sys.stdout.flush()  # a pipe buffers: what a time limit would kill must already be out


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    """The rows and `meta` as JSON, replacing `path` whole (a temporary sibling, then a rename)."""
    from codetune.storage import atomic_write_text

    document = {**meta, "rows": [row.__dict__ for row in rows]}
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


@dataclass
class Report:
    """The rows so far, printed and written (`--out`) as setup and each section end, so a command stopped by its
    time limit still returns the sections it finished; `complete` is true only in the last write."""

    out: Path | None
    meta: dict[str, Any]
    """What the JSON holds besides the rows, the timings and the budget (mode, sections, device)."""
    budget: Budget
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, part: str, rows: Sequence[Row], seconds: float) -> None:
        """Setup's or a section's rows: printed as a small table, and written with every row so far."""
        self.rows += rows
        label = f"section {part}, {SECTION_TITLES[part]}" if part in SECTION_TITLES else part
        render(rows, f"gpu_check {label}: {seconds:.0f} s")
        self.write(complete=False)

    def write(self, complete: bool, title: str | None = None) -> None:
        if self.out is None:
            return
        wall = time.perf_counter() - self.started
        write_json(self.out, self.rows, {
            "title": title or f"codetune GPU check ({self.meta['device']}; {wall:.0f} s so far)", **self.meta,
            "complete": complete, "wall_s": wall,
            "section_s": {name: round(seconds, 1) for name, seconds in self.budget.spent_s.items()},
            "budget": self.budget.report()})

    def finish(self) -> None:
        """The full table, and the JSON marked complete."""
        title = f"codetune GPU check ({self.meta['device']}; {time.perf_counter() - self.started:.0f} s)"
        render(self.rows, title)
        self.write(complete=True, title=title)
