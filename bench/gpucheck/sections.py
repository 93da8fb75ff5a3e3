"""The sections by letter, and running one within the budget: a section that runs out of time, or raises, becomes
a row and the next section runs."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from .budget import BudgetSpent
from .fits import Context, release
from .gpu_tests import section_gpu_tests
from .isolation import section_isolation
from .oom import section_oom
from .precision import section_precision
from .row import FAIL, Row
from .settings import SECTION_TITLES
from .training import section_training
from .turing import section_turing
from .use import section_use

SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "t": section_turing, "a": section_training, "b": section_oom, "c": section_precision, "d": section_isolation,
    "e": section_use, "f": section_gpu_tests,
}


def run_section(name: str, ctx: Context) -> tuple[list[Row], float]:
    """A section's rows within its budget, and its seconds."""
    ctx.budget.start(name)
    rows = _section_rows(name, ctx)
    seconds = ctx.budget.finish()
    print(f"gpu_check: section {name} ({SECTION_TITLES[name]}) done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, seconds


def _section_rows(name: str, ctx: Context) -> list[Row]:
    """A section's rows; one `skipped: budget` row when it starts after the total budget is spent (or spends it
    outside a row), one FAIL row when it raises (the traceback on stderr: the other sections still run)."""
    try:
        ctx.budget.check(f"section {name} ({SECTION_TITLES[name]})")
        return SECTIONS[name](ctx)
    except BudgetSpent as spent:
        release(ctx)
        return [ctx.budget.skipped_row(SECTION_TITLES[name], spent)]
    except Exception as err:  # noqa: BLE001  a section's failure is a FAIL row; the other sections still run
        traceback.print_exc(file=sys.stderr)
        release(ctx)
        return [Row(name, SECTION_TITLES[name], FAIL, f"{type(err).__name__}: {str(err)[:300]}")]
