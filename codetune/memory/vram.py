"""VRAM readings of one CUDA device and their peaks over a run, as plain numbers.

Two views of the same card are read together, because each misses what the other sees:

- NVML (the driver; what ``nvidia-smi`` shows): memory used on the whole device, i.e. this
  process's CUDA context (a few hundred MB that torch never counts), the caching allocator's
  blocks, library workspaces, and any other process on the card. It is *sampled*: a spike
  between two readings is missed. Its peak is ``peak_vram_gb``, what the card really had to hold,
  the figure to compare with a smaller card.
- torch's caching allocator: ``allocated`` (live tensors) <= ``reserved`` (blocks held from the
  driver). ``max_memory_allocated`` / ``max_memory_reserved`` are exact peaks since the process
  started (the monitor never resets them), so they catch spikes the sampling misses, but not the
  CUDA context or other processes.

Units: GB = 10**9 bytes (decimal, like the manifest's ``peak_vram_gb``); ``nvidia-smi`` prints MiB
(2**20 bytes), so a "24 GB" card that it shows as 24564 MiB reads 25.76 GB here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES_PER_GB = 10**9


@dataclass(frozen=True)
class VRAMReading:
    """One sample of the watched device: memory in bytes, utilisation in percent."""

    nvml_used: int
    nvml_total: int
    gpu_util_pct: int
    torch_allocated: int
    torch_reserved: int
    torch_peak_allocated: int
    torch_peak_reserved: int


@dataclass(frozen=True)
class VRAMPeaks:
    """The highest values over a run (resumed segments included), in bytes; None before any reading."""

    nvml_used: int | None = None
    torch_allocated: int | None = None
    torch_reserved: int | None = None
    card_total: int | None = None
    readings: int = 0

    @classmethod
    def of(cls, reading: VRAMReading) -> VRAMPeaks:
        return cls(nvml_used=reading.nvml_used, torch_allocated=reading.torch_peak_allocated,
                   torch_reserved=reading.torch_peak_reserved, card_total=reading.nvml_total, readings=1)

    def merged(self, other: VRAMPeaks) -> VRAMPeaks:
        """Peaks covering both; the card size is this one's when known (the newer segment's card)."""
        return VRAMPeaks(nvml_used=_max(self.nvml_used, other.nvml_used),
                         torch_allocated=_max(self.torch_allocated, other.torch_allocated),
                         torch_reserved=_max(self.torch_reserved, other.torch_reserved),
                         card_total=self.card_total if self.card_total is not None else other.card_total,
                         readings=self.readings + other.readings)


def reading_metrics(reading: VRAMReading) -> dict[str, float]:
    """The ``vram/*`` metrics logged for one reading (GB, and percent for utilisation)."""
    return {
        "vram/nvml_used_gb": reading.nvml_used / BYTES_PER_GB,
        "vram/nvml_total_gb": reading.nvml_total / BYTES_PER_GB,
        "vram/gpu_util_pct": float(reading.gpu_util_pct),
        "vram/torch_allocated_gb": reading.torch_allocated / BYTES_PER_GB,
        "vram/torch_reserved_gb": reading.torch_reserved / BYTES_PER_GB,
        "vram/torch_peak_gb": reading.torch_peak_allocated / BYTES_PER_GB,
    }


def vram_summary(peaks: VRAMPeaks, device_name: str | None, enabled: bool,
                 disabled_reason: str | None) -> dict[str, Any]:
    """The run's VRAM figures for people and the manifest: GB rounded to the MB, percent of the card."""
    return {
        "peak_vram_gb": _gb(peaks.nvml_used),
        "peak_vram_pct": _percent(peaks.nvml_used, peaks.card_total),
        "peak_torch_allocated_gb": _gb(peaks.torch_allocated),
        "peak_torch_reserved_gb": _gb(peaks.torch_reserved),
        "card_total_gb": _gb(peaks.card_total),
        "device_name": device_name,
        "readings": peaks.readings,
        "enabled": enabled,
        "disabled_reason": disabled_reason,
    }


def nvml_pci_bus_id(domain: int, bus: int, device: int) -> str:
    """The PCI address NVML looks a card up by, e.g. ``00000000:41:00.0`` (GPUs are PCI function 0)."""
    return f"{domain:08x}:{bus:02x}:{device:02x}.0"


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _gb(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / BYTES_PER_GB, 3)


def _percent(part: int | None, whole: int | None) -> float | None:
    return None if part is None or not whole else round(100 * part / whole, 1)
