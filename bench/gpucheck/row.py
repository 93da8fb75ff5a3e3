"""One line of the check's table, the statuses a line can have, and the number formats its text uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASS, FAIL, INCONCLUSIVE = "pass", "FAIL", "inconclusive"
NEEDS_CUDA = "skipped: needs CUDA"
SKIPPED_BUDGET = "skipped: budget"


@dataclass
class Row:
    """One line of the table."""

    section: str
    check: str
    status: str
    measured: str = ""
    criterion: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def pct(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"
