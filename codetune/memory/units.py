"""The units memory is stated in: binary GiB and MiB, and the GiB figures that every plan line, the manifest and
`codetune plan --json` show. (The VRAM monitor's readings are in decimal GB: `codetune.memory.vram`.)"""

from __future__ import annotations

GiB = 2**30
MiB = 2**20


def gib(size: int) -> str:
    """`size` bytes in GiB with two decimals, as every plan line shows them."""
    return f"{size / GiB:.2f}"


def gib_figure(size: int) -> float:
    """`size` bytes in GiB rounded to three decimals (about a MiB), as the manifest and `--json` record them."""
    return round(size / GiB, 3)
