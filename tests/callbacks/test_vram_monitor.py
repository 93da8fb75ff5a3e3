"""VRAM monitor: one warning and no figures without a GPU; exact readings, peaks and resume with a fake one."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from codetune.callbacks.vram_monitor import VRAMMonitor
from codetune.errors import ConfigError
from codetune.memory.vram import VRAMPeaks, VRAMReading, nvml_pci_bus_id, reading_metrics, vram_summary

GB = 10**9
OFF = "VRAMMonitor is off"
CARD_GB = 24.0


class FakeNVMLError(Exception):
    pass


class FakeGPU:
    """Stands in for pynvml and torch.cuda's memory queries: one card that plays a script of samples.

    A sample is (nvml_used, gpu_util, allocated, reserved, peak_allocated, peak_reserved), memory in GB;
    each NVML memory query moves to the next sample (the last one repeats), and the torch queries
    answer from the current one, as one reading asks NVML first.
    """

    NVMLError = FakeNVMLError

    def __init__(self, samples: list[tuple[float, ...]], total_gb: float = CARD_GB,
                 init_error: Exception | None = None, util_error: Exception | None = None) -> None:
        self.samples, self.total_gb, self.init_error, self.util_error = samples, total_gb, init_error, util_error
        self.index = -1
        self.calls: list[str] = []

    @property
    def sample(self) -> tuple[float, ...]:
        return self.samples[min(self.index, len(self.samples) - 1)]

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> str:
        self.calls.append(f"handle {bus_id}")
        return "handle"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        self.index += 1
        used, total = int(self.sample[0] * GB), int(self.total_gb * GB)
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if self.util_error is not None:
            raise self.util_error
        return SimpleNamespace(gpu=self.sample[1], memory=0)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeGPU:
        monkeypatch.setitem(sys.modules, "pynvml", self)
        for i, name in enumerate(["memory_allocated", "memory_reserved", "max_memory_allocated",
                                  "max_memory_reserved"], start=2):
            monkeypatch.setattr(torch.cuda, name, lambda device=None, i=i: int(self.sample[i] * GB))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0))
        return self


# The setup probe reads sample 0; then steps 3 and 6 (every 3), then the epoch end at step 7.
SCRIPT = [
    (1.0, 0, 0.5, 0.6, 0.5, 0.6),
    (9.5, 80, 6.0, 8.0, 7.0, 8.5),
    (11.25, 97, 6.5, 9.0, 8.25, 10.0),
    (10.0, 60, 6.0, 9.0, 8.25, 10.0),
]


class RecordingLogger:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, metrics))


def cuda_trainer(*loggers: RecordingLogger) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), global_step=0,
                           loggers=list(loggers), is_global_zero=True, callbacks=[],
                           default_root_dir="/nonexistent-run")


def drive(monitor: VRAMMonitor, trainer: SimpleNamespace, steps: range) -> None:
    """The hooks Lightning calls in a one-epoch fit of `steps` optimizer steps."""
    monitor.setup(trainer, None, "fit")
    train(monitor, trainer, steps)


def train(monitor: VRAMMonitor, trainer: SimpleNamespace, steps: range) -> None:
    """The hooks after `setup`."""
    for step in steps:
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, None, None, None, step - 1)
    monitor.on_train_epoch_end(trainer, None)
    monitor.on_train_end(trainer, None)
    monitor.teardown(trainer, None, "fit")


def off_warnings(record: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in record if OFF in str(w.message)]


# --- pure helpers -------------------------------------------------------------------------------

def reading(used: float, allocated: float, reserved: float) -> VRAMReading:
    return VRAMReading(nvml_used=int(used * GB), nvml_total=int(CARD_GB * GB), gpu_util_pct=50,
                       torch_allocated=0, torch_reserved=0, torch_peak_allocated=int(allocated * GB),
                       torch_peak_reserved=int(reserved * GB))


def test_peaks_are_the_maximum_of_each_measure_over_readings():
    peaks = VRAMPeaks()
    for r in [reading(9.0, 7.0, 8.0), reading(12.0, 6.0, 8.0), reading(10.0, 7.5, 9.0)]:
        peaks = peaks.merged(VRAMPeaks.of(r))
    assert peaks == VRAMPeaks(nvml_used=12 * GB, torch_allocated=int(7.5 * GB), torch_reserved=9 * GB,
                              card_total=24 * GB, readings=3)


def test_merging_a_restored_segment_keeps_this_card_and_counts_every_reading():
    earlier = VRAMPeaks(nvml_used=20 * GB, torch_allocated=15 * GB, torch_reserved=16 * GB, card_total=24 * GB,
                        readings=5)
    now = VRAMPeaks.of(VRAMReading(int(30 * GB), 80 * GB, 0, 0, 0, int(14 * GB), int(17 * GB)))
    assert now.merged(earlier) == VRAMPeaks(nvml_used=30 * GB, torch_allocated=15 * GB, torch_reserved=17 * GB,
                                            card_total=80 * GB, readings=6)
    assert VRAMPeaks().merged(earlier) == earlier


def test_summary_rounds_to_the_mb_and_gives_the_share_of_the_card():
    peaks = VRAMPeaks(nvml_used=18_123_456_789, torch_allocated=12_000_400_000, torch_reserved=14_500_000_000,
                      card_total=24_000_000_000, readings=4)
    assert vram_summary(peaks, "RTX", True, None) == {
        "peak_vram_gb": 18.123, "peak_vram_pct": 75.5, "peak_torch_allocated_gb": 12.0,
        "peak_torch_reserved_gb": 14.5, "card_total_gb": 24.0, "device_name": "RTX", "readings": 4,
        "enabled": True, "disabled_reason": None}
    empty = vram_summary(VRAMPeaks(), None, False, "no GPU")
    assert (empty["peak_vram_gb"], empty["peak_vram_pct"], empty["card_total_gb"], empty["readings"]) == (
        None, None, None, 0)


def test_reading_metrics_are_in_decimal_gb():
    r = VRAMReading(nvml_used=9_500_000_000, nvml_total=24_000_000_000, gpu_util_pct=87,
                    torch_allocated=6_000_000_000, torch_reserved=8_000_000_000, torch_peak_allocated=7_250_000_000,
                    torch_peak_reserved=9_000_000_000)
    assert reading_metrics(r) == {"vram/nvml_used_gb": 9.5, "vram/nvml_total_gb": 24.0, "vram/gpu_util_pct": 87.0,
                                  "vram/torch_allocated_gb": 6.0, "vram/torch_reserved_gb": 8.0,
                                  "vram/torch_peak_gb": 7.25}


def test_nvml_pci_bus_id_matches_nvidia_smi_format():
    assert nvml_pci_bus_id(0, 0x41, 0) == "00000000:41:00.0"
    assert nvml_pci_bus_id(1, 0xdc, 3) == "00000001:dc:03.0"


# --- the callback with a fake card --------------------------------------------------------------

def test_readings_every_n_steps_peaks_summary_table_and_shutdown(monkeypatch, capsys):
    gpu = FakeGPU(SCRIPT).install(monkeypatch)
    logger = RecordingLogger()
    monitor = VRAMMonitor(log_every_n_steps=3)
    drive(monitor, cuda_trainer(logger), range(1, 8))

    assert [step for step, _ in logger.records] == [3, 6, 7]
    assert logger.records[1][1] == {"vram/nvml_used_gb": 11.25, "vram/nvml_total_gb": 24.0,
                                    "vram/gpu_util_pct": 97.0, "vram/torch_allocated_gb": 6.5,
                                    "vram/torch_reserved_gb": 9.0, "vram/torch_peak_gb": 8.25}
    assert [m["vram/nvml_used_gb"] for _, m in logger.records] == [9.5, 11.25, 10.0]
    summary = monitor.summary()
    assert summary == {"peak_vram_gb": 11.25, "peak_vram_pct": 46.9, "peak_torch_allocated_gb": 8.25,
                       "peak_torch_reserved_gb": 10.0, "card_total_gb": 24.0,
                       "device_name": "NVIDIA GeForce RTX 4090", "readings": 3, "enabled": True,
                       "disabled_reason": None}
    assert monitor.manifest_results() == {"peak_vram_gb": 11.25, "vram": summary}
    assert gpu.calls == ["init", "handle 00000000:41:00.0", "shutdown"]
    out = capsys.readouterr().out
    assert "Peak VRAM on NVIDIA GeForce RTX 4090 (24.00 GB)" in out
    assert "11.25" in out and "46.9%" in out and "8.25" in out and "41.7%" in out


def test_one_reading_per_optimizer_step_under_accumulation(monkeypatch):
    FakeGPU(SCRIPT).install(monkeypatch)
    logger = RecordingLogger()
    monitor = VRAMMonitor(log_every_n_steps=2)
    trainer = cuda_trainer(logger)
    monitor.setup(trainer, None, "fit")
    for step in [1, 1, 2, 2, 2, 3]:  # several batches per optimizer step
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.on_train_epoch_end(trainer, None)
    assert [step for step, _ in logger.records] == [2, 3]


def test_state_dict_round_trip_keeps_the_peaks_of_both_segments(monkeypatch, capsys):
    FakeGPU(SCRIPT).install(monkeypatch)
    first = VRAMMonitor(log_every_n_steps=3)
    drive(first, cuda_trainer(), range(1, 8))
    state = first.state_dict()

    # Resumed on a 48 GB card, running lower; Lightning restores the state after setup, as here.
    FakeGPU([(1.0, 0, 0.1, 0.1, 0.1, 0.1), (5.0, 50, 3.0, 4.0, 3.5, 4.5)], total_gb=48.0).install(monkeypatch)
    resumed = VRAMMonitor(log_every_n_steps=3)
    trainer = cuda_trainer()
    resumed.setup(trainer, None, "fit")
    resumed.load_state_dict(state)
    trainer.global_step = 9
    resumed.on_train_batch_end(trainer, None, None, None, 0)

    assert first.summary()["peak_vram_pct"] == 46.9
    assert resumed.summary() == first.summary() | {"card_total_gb": 48.0, "peak_vram_pct": 23.4, "readings": 4}


def test_resumed_without_a_gpu_keeps_the_earlier_peaks_and_prints_nothing(monkeypatch, capsys):
    FakeGPU(SCRIPT).install(monkeypatch)
    first = VRAMMonitor(log_every_n_steps=3)
    drive(first, cuda_trainer(), range(1, 8))
    capsys.readouterr()

    resumed, cpu = VRAMMonitor(log_every_n_steps=3), cuda_trainer()
    cpu.strategy.root_device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine it resumes on has no GPU
    with pytest.warns(UserWarning, match=OFF):
        resumed.setup(cpu, None, "fit")
    resumed.load_state_dict(first.state_dict())
    cpu.global_step = 9
    resumed.on_train_batch_end(cpu, None, None, None, 0)
    resumed.on_train_end(cpu, None)
    assert capsys.readouterr().out == ""
    assert resumed.summary() == first.summary() | {"enabled": False, "disabled_reason": resumed.disabled_reason}
    assert "runs on cpu" in resumed.disabled_reason


@pytest.mark.parametrize(("gpu", "reason"), [
    (FakeGPU(SCRIPT, init_error=FakeNVMLError("NVML Shared Library Not Found")), "NVML did not start"),
    (FakeGPU(SCRIPT, init_error=OSError("libnvidia-ml.so.1: cannot open")), "NVML did not start"),
    (FakeGPU(SCRIPT, util_error=FakeNVMLError("Not Supported")), "NVML cannot read cuda:0"),
])
def test_nvml_failure_turns_the_monitor_off_with_one_warning(monkeypatch, capsys, gpu, reason):
    gpu.install(monkeypatch)
    logger = RecordingLogger()
    monitor, trainer = VRAMMonitor(log_every_n_steps=1), cuda_trainer(logger)
    with pytest.warns(UserWarning, match=OFF) as record:
        monitor.setup(trainer, None, "fit")
        # A monitor that is off holds no NVML: shut down at once when it had started.
        assert gpu.calls.count("shutdown") == (0 if gpu.init_error else 1)
        train(monitor, trainer, range(1, 4))
    assert len(off_warnings(record)) == 1 and reason in off_warnings(record)[0]
    assert not monitor.enabled and reason in monitor.disabled_reason
    assert logger.records == [] and capsys.readouterr().out == ""
    assert gpu.calls.count("shutdown") == (0 if gpu.init_error else 1)


def test_missing_pynvml_turns_the_monitor_off_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monitor = VRAMMonitor()
    with pytest.warns(UserWarning, match=OFF) as record:
        drive(monitor, cuda_trainer(), range(1, 3))
    assert len(off_warnings(record)) == 1 and "pynvml cannot be imported" in monitor.disabled_reason


@pytest.mark.parametrize("kwargs", [{"log_every_n_steps": 0}, {"device_index": -1}])
def test_bad_arguments_name_the_flag(kwargs):
    flag = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"--vram.{flag}="):
        VRAMMonitor(**kwargs)


def test_device_index_is_checked_against_the_visible_devices(monkeypatch):
    gpu = FakeGPU(SCRIPT).install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--vram.device_index=2: this process sees 2 CUDA device\(s\)"):
        VRAMMonitor(device_index=2).setup(cuda_trainer(), None, "fit")
    assert gpu.calls == []
    VRAMMonitor(device_index=1).setup(cuda_trainer(), None, "fit")
    assert gpu.calls[:2] == ["init", "handle 00000000:41:00.0"]


# --- in a real Trainer --------------------------------------------------------------------------

class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4)


class MetricsLogger(Logger):
    name, version = "metrics", "0"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def fit(monitor: VRAMMonitor, max_steps: int, logger: Logger | bool = False, ckpt_path: str | None = None,
        ) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    trainer.fit(TinyModule(), ckpt_path=ckpt_path)
    return trainer


def test_cpu_trainer_warns_once_and_reports_no_vram(recwarn, capsys):
    monitor = VRAMMonitor(log_every_n_steps=1)
    trainer = fit(monitor, max_steps=3)
    assert trainer.global_step == 3
    assert off_warnings(recwarn) == [
        "VRAMMonitor is off: the trainer runs on cpu, not on an NVIDIA CUDA device. The vram/* metrics and the "
        "manifest's peak_vram_gb will be missing for this run; they need an NVIDIA CUDA device, its driver (NVML) "
        "and `pip install nvidia-ml-py`."]
    summary = monitor.summary()
    assert summary["enabled"] is False and summary["peak_vram_gb"] is None and summary["readings"] == 0
    assert "runs on cpu" in summary["disabled_reason"]
    assert "Peak VRAM" not in capsys.readouterr().out


class FakeCUDAMonitor(VRAMMonitor):
    """Watches cuda:0 while the real Trainer runs on the CPU (the fake card answers the queries)."""

    def _watched_device(self, trainer: L.Trainer) -> torch.device:
        return torch.device("cuda", 0)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_real_fit_logs_every_n_steps_and_a_resumed_fit_keeps_the_peaks(monkeypatch, tmp_path, capsys):
    gpu = FakeGPU(SCRIPT).install(monkeypatch)
    logger = MetricsLogger()
    trainer = fit(FakeCUDAMonitor(log_every_n_steps=3), max_steps=7, logger=logger)
    vram = [(step, m["vram/nvml_used_gb"]) for step, m in logger.records if "vram/nvml_used_gb" in m]
    assert vram == [(3, 9.5), (6, 11.25), (7, 10.0)]
    assert gpu.calls == ["init", "handle 00000000:41:00.0", "shutdown"]
    assert "Peak VRAM on NVIDIA GeForce RTX 4090" in capsys.readouterr().out
    ckpt = tmp_path / "seven.ckpt"
    trainer.save_checkpoint(ckpt)

    FakeGPU([(1.0, 0, 0.1, 0.1, 0.1, 0.1), (5.0, 50, 3.0, 4.0, 3.5, 4.5)]).install(monkeypatch)
    resumed = FakeCUDAMonitor(log_every_n_steps=3)
    fit(resumed, max_steps=9, ckpt_path=str(ckpt))
    assert resumed.summary()["peak_vram_gb"] == 11.25 and resumed.summary()["peak_torch_reserved_gb"] == 10.0
    # Steps 3, 6, 7 before; then the end of epoch 0 at step 8 and step 9 (its epoch end is the same step).
    assert resumed.summary()["readings"] == 3 + 2


def cli_fit(monitor: VRAMMonitor, accelerator: str, run_dir: Path) -> L.Trainer:
    """A CPU fit as `codetune fit` runs it: the run's config.yaml, written first, holds what the user gave."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"trainer:\n  accelerator: {accelerator}\n")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                        default_root_dir=str(run_dir))
    trainer.fit(TinyModule())
    return trainer


def test_a_cpu_run_the_user_chose_is_not_warned_about(recwarn, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    chosen = VRAMMonitor()
    cli_fit(chosen, "cpu", tmp_path / "chosen")  # --trainer.accelerator cpu: the demo
    assert off_warnings(recwarn) == [] and chosen.enabled is False and "runs on cpu" in chosen.disabled_reason
    # --trainer.accelerator auto that found no GPU: the user expected one, and is told why there are no figures.
    cli_fit(VRAMMonitor(), "auto", tmp_path / "auto")
    assert len(off_warnings(recwarn)) == 1
