"""The host's available RAM, what a CPU run's memory plan is checked against (`MemoryPlan.required_ram_bytes`)."""

from __future__ import annotations

from pathlib import Path


def available_ram_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The RAM the kernel can give this process now without swapping (Linux's MemAvailable), or None where
    `meminfo` does not exist or has no such line (not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # in kB
    return None
