"""VRAM and GPU utilisation while training, read from NVML and torch's allocator, with the run's peaks."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from codetune.errors import ConfigError
from codetune.storage import CONFIG_NAME
from codetune.memory.vram import VRAMPeaks, VRAMReading, nvml_pci_bus_id, reading_metrics, vram_summary

# (row label, summary key) of the table printed at the end of training.
_TABLE_ROWS = (
    ("used on the card (NVML, sampled)", "peak_vram_gb"),
    ("reserved by torch (exact)", "peak_torch_reserved_gb"),
    ("allocated to tensors (exact)", "peak_torch_allocated_gb"),
)


class VRAMMonitor(Callback):
    """Logs the watched GPU's memory and utilisation every few optimizer steps and keeps the run's peaks.

    Each reading takes NVML's used and total memory and GPU utilisation (what ``nvidia-smi`` shows,
    CUDA context and other processes included) and torch's allocated, reserved and peak-allocated
    memory for the same device (see ``codetune/memory/vram.py`` for what each one counts). Readings are
    taken when ``trainer.global_step`` is a multiple of ``log_every_n_steps`` and at the end of every
    training epoch, so a run shorter than ``log_every_n_steps`` still has its peaks. Every rank
    watches its own device; the logger, the table and the manifest show rank zero's.

    Logged (to every trainer logger, at ``step=trainer.global_step``; GB = 10**9 bytes):
    ``vram/nvml_used_gb``, ``vram/nvml_total_gb``, ``vram/gpu_util_pct``, ``vram/torch_allocated_gb``,
    ``vram/torch_reserved_gb``, ``vram/torch_peak_gb`` (torch's ``max_memory_allocated``).

    ``summary()`` returns the run's figures: ``peak_vram_gb`` (highest NVML used memory sampled: what
    the card really held), ``peak_vram_pct`` (of the card), ``peak_torch_allocated_gb`` and
    ``peak_torch_reserved_gb`` (torch's exact peaks, not sampled), ``card_total_gb``, ``device_name``,
    ``readings``, ``enabled`` and ``disabled_reason``; the GB figures are None before any reading.
    The manifest records ``peak_vram_gb`` and the whole summary as ``vram`` under
    ``phase_4_training`` (through ``manifest_results()``). At the end of training rank zero prints
    the peaks as a table. The peaks are in ``state_dict``, so a resumed run's summary covers every
    segment in which the monitor was enabled.

    Without a CUDA root device, without ``pynvml`` (package ``nvidia-ml-py``), or when NVML does not
    start or cannot read the device (no NVIDIA driver, ROCm), the monitor turns itself off with one
    warning saying why; training goes on without the ``vram/*`` figures. A run on the CPU that the
    user chose (``--trainer.accelerator cpu``, or any CPU trainer while CUDA is available) turns it
    off silently: there is nothing to act on (``disabled_reason`` still says why).

    Args:
        log_every_n_steps: Optimizer steps between readings.
        device_index: CUDA device to watch, numbered as torch numbers them (``cuda:N``, i.e. after
            ``CUDA_VISIBLE_DEVICES``); None watches the trainer's root device.

    Raises:
        ConfigError: on a non-positive ``log_every_n_steps``, a negative ``device_index``, or (at
            setup) a ``device_index`` this process cannot see.

    Example (YAML)::

        vram:
          log_every_n_steps: 10
    """

    def __init__(self, log_every_n_steps: int = 10, device_index: int | None = None) -> None:
        if log_every_n_steps < 1:
            raise ConfigError(f"--vram.log_every_n_steps={log_every_n_steps}: must be a positive integer "
                              f"(optimizer steps between readings), e.g. 10.")
        if device_index is not None and device_index < 0:
            raise ConfigError(f"--vram.device_index={device_index}: must be a CUDA device index (0, 1, ...) or "
                              f"null for the trainer's device.")
        self.log_every_n_steps = log_every_n_steps
        self.device_index = device_index
        self.enabled = False
        self.disabled_reason: str | None = None
        self.device_name: str | None = None
        self.peaks = VRAMPeaks()
        self._nvml: Any = None  # the pynvml module, while this monitor holds NVML initialised
        self._handle: Any = None
        self._device: torch.device | None = None
        self._last_read_step: int | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.disabled_reason = self._start(self._watched_device(trainer))
        self.enabled = self.disabled_reason is None
        if not self.enabled and not _cpu_was_chosen(trainer):
            rank_zero_warn(f"VRAMMonitor is off: {self.disabled_reason}. The vram/* metrics and the manifest's "
                           f"peak_vram_gb will be missing for this run; they need an NVIDIA CUDA device, its "
                           f"driver (NVML) and `pip install nvidia-ml-py`.")

    def _watched_device(self, trainer: L.Trainer) -> torch.device:
        root = trainer.strategy.root_device
        if root.type != "cuda" or self.device_index is None:
            return root
        visible = torch.cuda.device_count()
        if self.device_index >= visible:
            raise ConfigError(f"--vram.device_index={self.device_index}: this process sees {visible} CUDA "
                              f"device(s) (indices 0 to {visible - 1}); pick one of them or null for the trainer's.")
        return torch.device("cuda", self.device_index)

    def _start(self, device: torch.device) -> str | None:
        """Open NVML on `device` and take one trial reading; the reason it cannot, or None."""
        if device.type != "cuda":
            return f"the trainer runs on {device}, not on an NVIDIA CUDA device"
        try:
            import pynvml
        except ImportError as err:
            return f"pynvml cannot be imported ({err})"
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as err:
            return f"NVML did not start ({type(err).__name__}: {err})"
        self._nvml, self._device = pynvml, device
        try:
            self._open_device(device)
            self._read()  # an unsupported query shows now, not in the middle of training
        except pynvml.NVMLError as err:
            self._shutdown()
            return f"NVML cannot read {device} ({type(err).__name__}: {err})"
        return None

    def _open_device(self, device: torch.device) -> None:
        # By PCI address, not index: NVML numbers every card on the host, torch only those in
        # CUDA_VISIBLE_DEVICES, so NVML index N need not be cuda:N.
        props = torch.cuda.get_device_properties(device)
        bus_id = nvml_pci_bus_id(props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
        self._handle = self._nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        self.device_name = self._nvml.nvmlDeviceGetName(self._handle)

    def _read(self) -> VRAMReading:
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        device = self._device
        return VRAMReading(
            nvml_used=int(memory.used), nvml_total=int(memory.total),
            gpu_util_pct=int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu),
            torch_allocated=torch.cuda.memory_allocated(device), torch_reserved=torch.cuda.memory_reserved(device),
            torch_peak_allocated=torch.cuda.max_memory_allocated(device),
            torch_peak_reserved=torch.cuda.max_memory_reserved(device),
        )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimizer steps: with accumulation several batches share one, read once.
        if trainer.global_step % self.log_every_n_steps == 0:
            self._read_and_log(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_and_log(trainer)

    def _read_and_log(self, trainer: L.Trainer) -> None:
        if not self.enabled or trainer.global_step == self._last_read_step:
            return
        reading = self._read()
        self.peaks = VRAMPeaks.of(reading).merged(self.peaks)  # this card's size wins after a resume
        self._last_read_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(reading_metrics(reading), step=trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero and self.peaks.readings:
            Console().print(_peaks_table(self.summary()))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._shutdown()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._shutdown()  # Lightning skips `teardown` after an exception

    def _shutdown(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
        self._nvml = self._handle = None

    def used_fraction(self) -> float | None:
        """The card's used memory over its total right now (NVML; the CUDA context, torch's cache and
        other processes included), or None while the monitor is off. Used by OOMBackoff's pro-active mode."""
        if not self.enabled or self._nvml is None:
            return None
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(memory.used) / int(memory.total)

    def summary(self) -> dict[str, Any]:
        """The run's VRAM figures (keys in the class docstring); GB = 10**9 bytes."""
        return vram_summary(self.peaks, self.device_name, self.enabled, self.disabled_reason)

    def manifest_results(self) -> dict[str, Any]:
        """What the run's manifest records under phase_4_training."""
        summary = self.summary()
        return {"peak_vram_gb": summary["peak_vram_gb"], "vram": summary}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"peaks": asdict(self.peaks), "device_name": self.device_name}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peaks = VRAMPeaks(**state_dict.get("peaks", {}))
        self.device_name = self.device_name or state_dict.get("device_name")


def _cpu_was_chosen(trainer: L.Trainer) -> bool:
    """Whether the trainer runs on the CPU because the user asked for it, rather than for want of a GPU. Lightning
    resolves `accelerator="auto"` without keeping what was asked, so that is read from the config the run saved
    (`codetune fit` writes config.yaml before it builds anything); a CPU trainer while CUDA is available can only
    have been asked for."""
    if trainer.strategy.root_device.type != "cpu":
        return False
    if torch.cuda.is_available():
        return True
    saved = Path(trainer.default_root_dir) / CONFIG_NAME
    config = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    return isinstance(config, dict) and str((config.get("trainer") or {}).get("accelerator")) == "cpu"


def _peaks_table(summary: dict[str, Any]) -> Table:
    total = summary["card_total_gb"]
    table = Table(title=f"Peak VRAM on {summary['device_name']} ({total:.2f} GB)")
    table.add_column("peak")
    table.add_column("GB", justify="right")
    table.add_column("of card", justify="right")
    for label, key in _TABLE_ROWS:
        table.add_row(label, f"{summary[key]:.2f}", f"{100 * summary[key] / total:.1f}%")
    return table
