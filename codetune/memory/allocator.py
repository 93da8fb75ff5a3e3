"""The CUDA caching allocator's configuration: expandable segments, unless you chose otherwise.

Why. A training step frees the loss chunk's three large fp32 ``[c, V]`` buffers and then runs the
last decoder layer's backward (its forward again, with checkpointing), whose tensors are smaller
and differently sized. By default the caching allocator carves each new request out of a cached
segment or asks the driver for a new fixed-size one, so what the re-run takes splits the freed
segments and leaves gaps that no later request fits: reserved memory grows past the allocated peak,
and on a 6 GiB card planned to within half a GiB one such gap is an out-of-memory error (the OOM
back-off then halves the micro-batch for the rest of the run). With ``expandable_segments:True``
the allocator maps more physical memory onto the end of one growing segment instead of carving new
ones, so freed memory is reused for requests of other sizes; the memory plan's `ALLOCATOR_MARGIN`
(`codetune.memory.shapes`) assumes it.

When. torch reads the variable once, when its allocator configuration is first used (the first
CUDA allocation at the latest); a change after that is ignored. So `codetune.__main__.main` sets it
before it dispatches any command, before anything imports torch: this module imports only the
standard library.

Which variable. torch 2.13 reads ``PYTORCH_CUDA_ALLOC_CONF`` and, only when that is unset,
``PYTORCH_ALLOC_CONF`` (c10/cuda/CUDAAllocatorConfig.h); an empty value counts as set. If you set
either, codetune leaves both alone. Expandable segments exist only on Linux (elsewhere torch warns
and ignores them), so on other platforms codetune sets nothing.

Who chose it. The setter marks its own choice with `DEFAULT_MARKER` in the same environment, so
the record (`allocator_record`, in MANIFEST.json's ``phase_3_model.cuda_allocator``) can tell our
default (the marker, and the variable still holding our value) from yours, in this process and in the processes it starts (DDP ranks inherit both), with
no state kept in the module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

# In the order torch reads them: the first one set is the one it uses.
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULT_ALLOC_CONF = "expandable_segments:True"
DEFAULT_MARKER = "CODETUNE_ALLOC_CONF_DEFAULT"


def set_allocator_default(environ: MutableMapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (and `DEFAULT_MARKER`) in `environ` (default
    `os.environ`) unless either allocator variable is already set or `platform` (default `sys.platform`) is not
    Linux. Returns whether it set them. Call it before torch is imported."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux") or any(name in environ for name in ALLOC_CONF_VARIABLES):
        return False
    environ[ALLOC_CONF_VARIABLES[0]] = DEFAULT_ALLOC_CONF
    environ[DEFAULT_MARKER] = "1"
    return True


def allocator_record(environ: Mapping[str, str] | None = None, platform: str | None = None) -> dict[str, Any]:
    """What the CUDA allocator is configured with, for the run manifest.

    Keys: ``variable`` (the one torch reads, None when neither is set), ``value``, ``expandable_segments``
    (whether torch turns them on: ``expandable_segments:True`` in the value, on Linux), ``chosen_by``
    ('codetune' for our default, 'you' for a variable set before codetune started, None when nobody set one)
    and ``note`` (why no one did, else None).
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    linux = platform.startswith("linux")
    variable = next((name for name in ALLOC_CONF_VARIABLES if name in environ), None)
    if variable is None:
        note = ("codetune sets it when started as `codetune` or `python -m codetune`" if linux else
                f"expandable segments are not supported on {platform}: codetune leaves torch's defaults")
        return {"variable": None, "value": None, "expandable_segments": False, "chosen_by": None, "note": note}
    value = environ[variable]
    ours = environ.get(DEFAULT_MARKER) == "1" and variable == ALLOC_CONF_VARIABLES[0] and value == DEFAULT_ALLOC_CONF
    return {"variable": variable, "value": value, "expandable_segments": linux and expandable_segments(value),
            "chosen_by": "codetune" if ours else "you", "note": None}


def expandable_segments(value: str) -> bool:
    """Whether an allocator configuration (``key:value`` pairs separated by commas) turns expandable segments on.

    torch accepts only ``True`` or ``False`` for it: any other spelling is an error when torch parses the value.
    """
    enabled = False
    for pair in value.split(","):
        key, _, setting = pair.partition(":")
        if key.strip() == "expandable_segments":
            enabled = setting.strip() == "True"
    return enabled
