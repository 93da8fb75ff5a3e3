"""What fits a card: the largest micro-batch of an effective batch, and whether gradient checkpointing is needed.

Each answer compares `plan_memory`'s plans with a card's free memory, read either on an empty card (`codetune
plan`) or with the model already loaded (`fit`, `after_load`; see `MemoryPlan.fits_after_load`). `plan_for_card` is
the plan that `fit` and `codetune plan` alike train with for `--data.batch_size` and
`--model.gradient_checkpointing` (numbers, or `auto`).
"""

from __future__ import annotations

from dataclasses import replace

from codetune.errors import ConfigError
from codetune.memory.estimate import plan_memory
from codetune.memory.shapes import CheckpointingChoice, MemoryPlan, MicroBatchChoice, ModelShape, TrainingShape


def largest_micro_batch(effective_batch: int, free_bytes: int, model: ModelShape, training: TrainingShape,
                        after_load: bool = False) -> MicroBatchChoice | None:
    """The largest micro-batch dividing `effective_batch` whose plan fits `free_bytes`, or None.

    Every divisor is tried, largest first, so ``micro x accumulation == effective_batch`` always
    holds; `training.micro_batch_size` is ignored. `after_load` says that `free_bytes` was read with
    the model already on the card (`MemoryPlan.fits_after_load`), else on an empty card (`fits`).
    """
    if effective_batch < 1:
        raise ConfigError(f"effective batch {effective_batch}: must be >= 1 (--data.batch_size x "
                          f"--data.gradient_accumulation_steps)")
    for micro in sorted((m for m in range(1, effective_batch + 1) if effective_batch % m == 0), reverse=True):
        plan = plan_memory(model, replace(training, micro_batch_size=micro))
        if _fits(plan, free_bytes, after_load):
            return MicroBatchChoice(micro, effective_batch // micro, plan)
    return None


def plan_with_checkpointing_choice(model: ModelShape, training: TrainingShape, free_bytes: int,
                                   after_load: bool = False) -> CheckpointingChoice:
    """`--model.gradient_checkpointing auto` at `training.micro_batch_size`: off when the plan without it fits.

    Checkpointing re-runs every layer's forward in backward (about a third more compute), so it is
    turned on only when the plan without it does not fit `free_bytes`; then the plan with it is
    returned, whether or not that one fits (the caller warns). `after_load` as in `largest_micro_batch`.
    """
    without = plan_memory(model, replace(training, gradient_checkpointing=False))
    if _fits(without, free_bytes, after_load):
        return CheckpointingChoice(without, False)
    return CheckpointingChoice(plan_memory(model, replace(training, gradient_checkpointing=True)), True)


def largest_micro_batch_with_checkpointing_choice(effective_batch: int, free_bytes: int, model: ModelShape,
                                                  training: TrainingShape,
                                                  after_load: bool = False) -> MicroBatchChoice | None:
    """`--data.batch_size auto` with `--model.gradient_checkpointing auto`: the largest micro-batch that fits
    without checkpointing; only when none does (not even 1), the largest that fits with it. None if neither.

    Without checkpointing even micro-batch 1 is usually faster than a larger one with it: it saves the
    re-run of every layer, and ``seq_len`` tokens already keep the matmuls busy.
    """
    for checkpointing in (False, True):
        choice = largest_micro_batch(effective_batch, free_bytes, model,
                                     replace(training, gradient_checkpointing=checkpointing), after_load)
        if choice is not None:
            return choice
    return None


def largest_fitting(effective_batch: int, free_bytes: int, model: ModelShape, training: TrainingShape,
                    checkpointing_auto: bool, after_load: bool = False) -> MicroBatchChoice | None:
    """What `--data.batch_size auto` picks: `largest_micro_batch`, with the checkpointing choice when
    `--model.gradient_checkpointing auto` (`checkpointing_auto`), else at `training`'s checkpointing."""
    pick = largest_micro_batch_with_checkpointing_choice if checkpointing_auto else largest_micro_batch
    return pick(effective_batch, free_bytes, model, training, after_load)


def plan_for_card(model: ModelShape, training: TrainingShape, free_bytes: int, checkpointing_auto: bool,
                  effective_batch: int | None = None, after_load: bool = False) -> MemoryPlan:
    """The plan fit trains with on a card with `free_bytes` free (`fit` and `codetune plan` alike).

    With `effective_batch` (`--data.batch_size auto`) the micro-batch is `largest_fitting`'s, or 1 when
    none fits (the OOM back-off is then the last resort); otherwise `training.micro_batch_size`. With
    `checkpointing_auto` checkpointing is on only when the step does not fit without it.
    """
    if effective_batch is not None:
        choice = largest_fitting(effective_batch, free_bytes, model, training, checkpointing_auto, after_load)
        if choice is not None:
            return choice.plan
        training = replace(training, micro_batch_size=1)
    if checkpointing_auto:
        return plan_with_checkpointing_choice(model, training, free_bytes, after_load).plan
    return plan_memory(model, training)


def _fits(plan: MemoryPlan, free_bytes: int, after_load: bool) -> bool:
    return plan.fits_after_load(free_bytes) if after_load else plan.fits(free_bytes)
