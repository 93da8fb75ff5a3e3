"""The time the sections may take: `--budget-s` shared between the sections run in the proportions of
`SECTION_BUDGET_S`, each section's cap checked before each unit of work (a fit, a row)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .row import SKIPPED_BUDGET, Row
from .settings import SECTION_BUDGET_S


class BudgetSpent(Exception):
    """A unit of work was not started (or was stopped): its section's cap or the total budget is spent."""

    def __init__(self, what: str, reason: str, figures: dict[str, Any]) -> None:
        super().__init__(f"{reason}; not run: {what}")
        self.what, self.reason, self.figures = what, reason, figures


@dataclass
class Budget:
    """Seconds the sections may take: `total_s` for all of them, and each section a cap (`caps_s`).

    A section calls `check` before each unit of work (a fit, a row); with no time left, in its cap or in the
    total, the unit is not started and `BudgetSpent` says what was not run, which `budgeted` turns into a
    `skipped: budget` row. A unit already started runs to its end: a fit cannot be stopped mid-run, so a section
    overruns its cap by at most its last unit. The clock starts with the first section (setup is outside);
    `clock` is any monotonic seconds function, so a test can advance time by hand.
    """

    total_s: float
    caps_s: dict[str, float]
    clock: Callable[[], float] = time.perf_counter
    spent_s: dict[str, float] = field(default_factory=dict)
    """Seconds each finished section took."""
    not_run: dict[str, list[str]] = field(default_factory=dict)
    """What each section did not run for lack of time (absent: the budget was not hit)."""
    section: str | None = None
    _began: float | None = field(default=None, init=False, repr=False)
    _section_began: float = field(default=0.0, init=False, repr=False)

    @classmethod
    def shared(cls, total_s: float, sections: Sequence[str], clock: Callable[[], float] = time.perf_counter) -> Budget:
        """`total_s` split between `sections` in the proportions of `SECTION_BUDGET_S`."""
        weight = sum(SECTION_BUDGET_S[name] for name in sections)
        return cls(total_s, {name: total_s * SECTION_BUDGET_S[name] / weight for name in sections}, clock)

    @classmethod
    def unlimited(cls) -> Budget:
        return cls(math.inf, {})

    def start(self, section: str) -> None:
        now = self.clock()
        self._began = now if self._began is None else self._began
        self.section, self._section_began = section, now

    def finish(self) -> float:
        """Ends the current section; its seconds."""
        spent = self.section_elapsed_s()
        self.spent_s[self.section] = spent
        self.section = None
        return spent

    def section_elapsed_s(self) -> float:
        return 0.0 if self.section is None else self.clock() - self._section_began

    def total_elapsed_s(self) -> float:
        return 0.0 if self._began is None else self.clock() - self._began

    def left_s(self) -> float:
        """Seconds the current section may still start work in: the least of its cap's and the total's."""
        cap = self.caps_s.get(self.section, math.inf)
        return min(cap - self.section_elapsed_s(), self.total_s - self.total_elapsed_s())

    def check(self, what: str) -> None:
        """Raises `BudgetSpent` when no time is left to start `what`."""
        if self.left_s() <= 0:
            raise self.spent(what)

    def spent(self, what: str) -> BudgetSpent:
        """Records that `what` was not run (or was stopped) and returns the exception that says so."""
        self.not_run.setdefault(self.section, []).append(what)
        cap, elapsed = self.caps_s.get(self.section, math.inf), self.section_elapsed_s()
        reason = f"section {self.section} cap {cap:.0f} s, {elapsed:.0f} s spent"
        if self.total_elapsed_s() >= self.total_s:
            reason += f"; total budget {self.total_s:.0f} s spent ({self.total_elapsed_s():.0f} s)"
        figures = {"cap_s": cap, "spent_s": elapsed, "total_s": self.total_s,
                   "total_spent_s": self.total_elapsed_s(), "not_run": what}
        return BudgetSpent(what, reason, figures)

    def skipped_row(self, check: str, spent: BudgetSpent) -> Row:
        return Row(self.section or "", check, SKIPPED_BUDGET, f"{spent.reason}; not run: {spent.what}",
                   f"--budget-s {self.total_s:g}: this section's share {spent.figures['cap_s']:.0f} s",
                   spent.figures)

    def report(self) -> dict[str, Any]:
        """The budget in the JSON: the total, and each section's cap, seconds spent and what it did not run."""
        sections = {name: {"cap_s": cap, "spent_s": self.spent_s.get(name), "hit": name in self.not_run,
                           "not_run": self.not_run.get(name, [])} for name, cap in self.caps_s.items()}
        return {"total_s": self.total_s, "total_spent_s": self.total_elapsed_s(), "sections": sections}
