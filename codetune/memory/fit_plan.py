"""The memory plan `fit` makes once, when the model is loaded: the micro-batch and gradient checkpointing to train
with, printed next to the free memory, and the manifest's record of it (`phase_3_model.vram_plan`).

`CodeLoRAModule.configure_model` reads the free memory with the weights and adapters already loaded (the card's,
the smallest of all ranks' under DDP: `smallest_free_memory`; on the CPU the available RAM) and hands it to
`plan_fit` with the run's `TrainingShape`. Because the model is loaded, the free memory is compared with what
training will still allocate (`MemoryPlan.fits_after_load`), never with the whole plan. `--data.batch_size auto`
takes its micro-batch from the plan and `--model.gradient_checkpointing auto` its choice (`plan_for_card`); without a
card there is nothing to fit, so `auto` means the whole batch and checkpointing off, and a plan that does not fit
the RAM stops the run before any step (a CPU run does not run out of memory, it swaps until the kernel kills it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, NamedTuple

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from codetune.errors import ConfigError
from codetune.memory.estimate import plan_memory
from codetune.memory.report import format_plan
from codetune.memory.search import plan_for_card
from codetune.memory.shapes import CPU_RSS_FACTOR, CPU_RSS_OVERHEAD_BYTES, MemoryPlan, ModelShape, TrainingShape
from codetune.memory.units import MiB, gib, gib_figure


class FitPlan(NamedTuple):
    """What `fit` trains with, and the manifest's record of the plan behind it (None when none could be made)."""

    record: dict[str, Any] | None
    gradient_checkpointing: bool
    micro_batch_size: int


def smallest_free_memory(local: int, world_size: int, reduce_min: Callable[[int], int]) -> int:
    """The least free memory of any rank's card (this rank's `local` with one process), `reduce_min` being the
    strategy's minimum over all ranks. The micro-batch and the checkpointing that the plan chooses must be one for
    all ranks (they cut the same optimizer step alike), and the smallest card is the one that decides what fits.
    Every rank calls this, once, when its model is loaded."""
    if world_size == 1:
        return local
    smallest = reduce_min(local)
    rank_zero_info(f"codetune: the memory plan is made for the smallest free memory of the {world_size} ranks' "
                   f"cards, {gib(smallest)} GiB (rank 0's: {gib(local)} GiB), so that every rank "
                   f"trains at the same micro-batch and gradient checkpointing.")
    return smallest


def plan_fit(model_config: Any, training: TrainingShape, *, free: int | None, ram: int | None,
             effective_batch: int | None, checkpointing: bool | Literal["auto"], device: str) -> FitPlan:
    """The plan `fit` trains with, printed, and what it chose.

    `training` is the run's shape at the micro-batch given (1 under `--data.batch_size auto`), with checkpointing
    on only when `--model.gradient_checkpointing` (`checkpointing`) is true. `free` is the card's free memory read
    with the model loaded, None without a card; then `ram` is the available RAM (None where it cannot be read).
    `effective_batch` is the optimizer batch under `--data.batch_size auto`, else None. `device` names the device
    in what is printed.

    Raises:
        ConfigError: under `--data.batch_size auto` when no plan can be made for this model; on the CPU when the
            plan does not fit the available RAM.
    """
    try:
        shape = ModelShape.from_config(model_config)
    except (AttributeError, TypeError) as err:  # a config without the decoder fields the plan reads
        return _without_plan(err, training, free, effective_batch, checkpointing)
    try:
        plan = _choose(shape, training, free, effective_batch, checkpointing == "auto", device)
    except ConfigError as err:
        if effective_batch is not None:
            raise
        return _without_plan(err, training, free, effective_batch, checkpointing)
    chosen = plan.training
    title = _plan_title(plan, checkpointing, "VRAM" if free is not None else "RAM")
    if free is not None:
        _report_card_plan(plan, free, title)
        record = plan_record(plan, free, plan.required_free_bytes(after_load=True), "VRAM")
    else:
        _report_ram_plan(plan, ram, checkpointing, title)
        record = plan_record(plan, ram, plan.required_ram_bytes(), "RAM")
    return FitPlan(record, chosen.gradient_checkpointing, chosen.micro_batch_size)


def plan_record(plan: MemoryPlan, free: int | None, required: int, memory: str) -> dict[str, Any]:
    """The manifest's `vram_plan`: the plan's figures, and the free memory (`memory`: VRAM, or RAM on the CPU)."""
    return {"memory": memory, "predicted_peak_gib": gib_figure(plan.total),
            "free_gib": None if free is None else gib_figure(free),
            "free_read": "after the model was loaded", "required_free_gib": gib_figure(required),
            "micro_batch_size": plan.training.micro_batch_size,
            "gradient_checkpointing": plan.training.gradient_checkpointing,
            "terms_gib": {k: gib_figure(v) for k, v in plan.terms().items()}}


def ram_plan_message(plan: MemoryPlan, available: int, checkpointing_flag: bool | str) -> str:
    """What stops a CPU run whose memory plan does not fit the available RAM: the figures and what to lower."""
    tr = plan.training
    fixes = [f"--data.seq_len (now {tr.seq_len})", f"--data.batch_size (now {tr.micro_batch_size})"]
    if not tr.gradient_checkpointing:
        with_it = plan_memory(plan.model, replace(tr, gradient_checkpointing=True))
        fixes.append(f"--model.gradient_checkpointing true (now {checkpointing_flag}; "
                     f"{gib(with_it.required_ram_bytes())} GiB)")
    return (f"the memory plan does not fit this machine's RAM: micro-batch {tr.micro_batch_size} x {tr.seq_len} "
            f"tokens is predicted to peak at {gib(plan.total)} GiB, so training needs "
            f"{gib(plan.required_ram_bytes())} GiB of RAM beyond the loaded model (what is left to allocate "
            f"x{CPU_RSS_FACTOR:g} for what the CPU heap keeps, + {CPU_RSS_OVERHEAD_BYTES // MiB} MiB), and "
            f"{gib(available)} GiB are available: it would swap until the system kills it. Lower "
            f"{', or '.join(fixes)}, or close other programs; `codetune plan` shows the plan's terms.")


def _choose(shape: ModelShape, training: TrainingShape, free: int | None, effective_batch: int | None,
            auto_checkpointing: bool, device: str) -> MemoryPlan:
    """The plan of the micro-batch and checkpointing to train with: both as given, or chosen by the plan for
    the free memory (`auto`); without a card (CPU) `auto` means checkpointing off and the whole batch."""
    if free is None:  # no card to fit
        if effective_batch is not None:
            rank_zero_info(f"codetune: --data.batch_size auto on {device}: no card to fit, "
                           f"micro-batch {effective_batch}.")
            training = replace(training, micro_batch_size=effective_batch)
        return plan_memory(shape, training)
    plan = plan_for_card(shape, training, free, auto_checkpointing, effective_batch, after_load=True)
    if effective_batch is not None:
        tr = plan.training
        if plan.fits_after_load(free):
            rank_zero_info(f"codetune: --data.batch_size auto: micro-batch {tr.micro_batch_size} x "
                           f"{effective_batch // tr.micro_batch_size} accumulation fits {gib(free)} GiB free.")
        else:
            rank_zero_warn(f"codetune: --data.batch_size auto: even micro-batch 1 is predicted not to fit the "
                           f"{gib(free)} GiB free; starting at 1 (the OOM back-off is the last resort).")
    return plan


def _without_plan(why: Exception, training: TrainingShape, free: int | None, effective_batch: int | None,
                  checkpointing: bool | str) -> FitPlan:
    """No plan can be made for this model: a number must be given for what the plan would choose."""
    if effective_batch is not None:
        raise ConfigError(f"--data.batch_size auto needs a VRAM plan, and none can be made for this model "
                          f"({why}). Give --data.batch_size a number.") from why
    on = checkpointing is True or (checkpointing == "auto" and free is not None)
    auto = (f" --model.gradient_checkpointing auto turns it {'on' if on else 'off'} (no card)"
            if checkpointing == "auto" else "")
    rank_zero_warn(f"codetune: no VRAM plan for this model ({why}); training goes on without one.{auto}")
    return FitPlan(None, on, training.micro_batch_size)


def _plan_title(plan: MemoryPlan, checkpointing: bool | str, memory: str) -> str:
    auto = " by the plan" if checkpointing == "auto" else ""
    return (f"codetune {memory} plan (micro-batch {plan.training.micro_batch_size}, gradient checkpointing "
            f"{'on' if plan.training.gradient_checkpointing else 'off'}{auto})")


def _report_card_plan(plan: MemoryPlan, free: int, title: str) -> None:
    rank_zero_info(f"{title}:\n{format_plan(plan, free, after_load=True)}")
    if not plan.fits_after_load(free):
        rank_zero_warn(f"codetune: the plan needs {gib(plan.required_free_bytes(after_load=True))} GiB more "
                       f"than the weights, and {gib(free)} GiB are free; expect OOM back-offs (or lower "
                       f"--data.batch_size / --data.seq_len; `codetune plan` shows what fits).")


def _report_ram_plan(plan: MemoryPlan, ram: int | None, checkpointing: bool | str, title: str) -> None:
    """Print a CPU plan against the available RAM, and stop (ConfigError) when it does not fit: on the CPU there
    is no OOM to back off from, the machine swaps until the kernel kills the process."""
    rank_zero_info(f"{title}:\n{format_plan(plan, ram)}")
    if ram is None:
        rank_zero_warn("codetune: the available RAM cannot be read here (no MemAvailable in /proc/meminfo), so "
                       "the memory plan is not checked against it; watch the first steps' memory.")
    elif plan.required_ram_bytes() > ram:
        raise ConfigError(ram_plan_message(plan, ram, checkpointing))
