"""OOM back-off: an injected OOM at step k changes the split, never what is learned."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import codetune.data.datamodule as datamodule_lib
import codetune.model.module as module_lib
import codetune.model.step as step_lib
from codetune.callbacks.oom_backoff import OOMBackoff
from codetune.callbacks.vram_monitor import VRAMMonitor
from codetune.memory.backoff import InjectedOOM, accumulation_steps, halved
from codetune.model.step import StepNumerics
from codetune.cli import build_cli
from codetune.__main__ import main
from codetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(ROOT / "configs" / "training_config.yaml"),
           "--config", str(ROOT / "tests" / "tiny.yaml")]
INJECT_AT = 2


def fit_args(repo: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    # Dropout off: a retried micro-batch would otherwise draw other dropout masks.
    return ["fit", *CONFIGS, "--data.repo", str(repo), "--runs_dir", str(tmp / "runs"), "--run_name", name,
            "--data.cache_dir", str(tmp / "token-cache"), "--data.seq_len", "64", "--data.batch_size", "2",
            "--data.gradient_accumulation_steps", "2", "--model.lora_dropout", "0.0",
            "--generation.max_new_tokens", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "1.0", "--trainer.max_epochs", "1", *extra]


class MicroBatchRecorder:
    """Records the micro-batches (sample ids, target counts) of every attempt; the last attempt of a step is the
    one applied."""

    def __init__(self, monkeypatch) -> None:
        self.attempts: list[list[torch.Tensor]] = []
        self.targets: list[list[int]] = []
        original = step_lib.split_batch

        def recording(batch, micro_batch_size):
            micro = original(batch, micro_batch_size)
            if torch.is_grad_enabled():  # training, not validation
                self.attempts.append([m["sample_ids"].clone() for m in micro])
                self.targets.append([int((m["labels"][:, 1:] != -100).sum()) for m in micro])
            return micro

        monkeypatch.setattr(step_lib, "split_batch", recording)


def oom_in_every_training_forward(monkeypatch) -> None:
    """A card too small for any micro-batch: every training forward raises; validation still runs."""
    original = module_lib.CodeLoRAModule.loss_sum

    def oom_in_training(self, batch):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(module_lib.CodeLoRAModule, "loss_sum", oom_in_training)


def mostly_padding_windows(monkeypatch, every: int = 3, real: int = 6) -> None:
    """Every `every`-th packed window keeps only its first `real` tokens, the rest padding (as a window of FIM
    samples, or a split's last one, ends): micro-batches then hold very unequal target counts, so a loss
    normalised per micro-batch rather than per optimizer batch would weigh the windows by how the batch is cut."""
    original = datamodule_lib.pack_samples

    def packed(*args, **kwargs):
        windows = original(*args, **kwargs)
        n_real = windows.n_real.copy()
        n_real[::every] = np.minimum(n_real[::every], real)
        return dataclasses.replace(windows, n_real=n_real)

    monkeypatch.setattr(datamodule_lib, "pack_samples", packed)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from helpers import write_fixture_repo

    return write_fixture_repo(tmp_path_factory.mktemp("oom") / "repo")


def test_injected_oom_trains_the_same_weights_and_samples(repo, tmp_path, monkeypatch):
    mostly_padding_windows(monkeypatch)
    clean = MicroBatchRecorder(monkeypatch)
    build_cli(fit_args(repo, tmp_path, "clean"))
    clean_attempts, clean_targets = list(clean.attempts), list(clean.targets)  # the next recorder wraps this one

    monkeypatch.setenv("CODETUNE_INJECT_OOM", str(INJECT_AT))
    injected = MicroBatchRecorder(monkeypatch)
    with pytest.warns(UserWarning, match=f"out of device memory at step {INJECT_AT} with micro-batch 2"):
        cli = build_cli(fit_args(repo, tmp_path, "oom"))

    # One extra (failed) attempt, at step k: micro-batches of 2 before, of 1 from the retry on.
    assert len(clean_attempts) > INJECT_AT + 1, "the epoch must go past the injected step"
    assert len(injected.attempts) == len(clean_attempts) + 1
    failed = injected.attempts.pop(INJECT_AT)
    assert [len(m) for m in failed] == [2, 2]
    sizes = [[len(m) for m in attempt] for attempt in injected.attempts]
    assert all(s == [2, 2] for s in sizes[:INJECT_AT]) and all(max(s) == 1 for s in sizes[INJECT_AT:]), sizes
    assert all(len(s) == 4 for s in sizes[INJECT_AT:-1]), "accumulation doubled to 4"
    # Every window is trained exactly once in the epoch, with or without the OOM, in the same steps.
    trained = torch.cat([m for attempt in injected.attempts for m in attempt])
    assert sorted(trained.tolist()) == list(range(cli.datamodule.train_windows.input_ids.shape[0]))
    for a, b in zip(injected.attempts, clean_attempts):
        assert torch.equal(torch.cat(a), torch.cat(b))
    # The steps cut differently hold micro-batches of very unequal target counts (one window mostly padding), so
    # equal weights below mean each token weighs 1 / (the optimizer batch's targets), not 1 / (its micro-batch's).
    unequal = [t for t in clean_targets[INJECT_AT:] if max(t) > 1.5 * min(t)]
    assert unequal, clean_targets

    clean_w, oom_w = adapter(tmp_path / "runs" / "clean"), adapter(tmp_path / "runs" / "oom")
    assert clean_w.keys() == oom_w.keys()
    moved = max((oom_w[k] - clean_w[k]).abs().max().item() for k in clean_w)
    assert moved < 1e-5, moved
    # ...while training moved the weights by far more than that (the comparison is not vacuous).
    assert any(("lora_B" in k) and clean_w[k].abs().max() > 1e-2 for k in clean_w)

    manifest = json.loads((tmp_path / "runs" / "oom" / "MANIFEST.json").read_text())
    training = manifest["phase_results"]["phase_4_training"]
    assert training["oom_backoffs"] == [{"step": INJECT_AT, "micro_batch_size": 1, "gradient_accumulation_steps": 4,
                                        "reason": "oom"}]
    assert training["final_micro_batch_size"] == 1
    # The schedule did not advance for the failed attempt: same number of optimizer steps.
    clean_manifest = json.loads((tmp_path / "runs" / "clean" / "MANIFEST.json").read_text())
    assert training["training_stats"]["optimizer_steps"] == \
        clean_manifest["phase_results"]["phase_4_training"]["training_stats"]["optimizer_steps"]

    # The halved micro-batch is in the checkpoint, and a resumed run starts from it.
    ckpt = torch.load(tmp_path / "runs" / "oom" / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("OOMBackoff"))
    assert state["events"][-1]["micro_batch_size"] == 1
    assert ckpt["codetune"]["micro_batches"] == {"backed_off_to": 1}, "the step checkpoints its micro-batch too"
    monkeypatch.delenv("CODETUNE_INJECT_OOM")
    resumed = MicroBatchRecorder(monkeypatch)
    build_cli(fit_args(repo, tmp_path, "oom", "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert resumed.attempts and all(max(len(m) for m in a) == 1 for a in resumed.attempts)
    resumes_at_the_back_off_from_either_state(repo, tmp_path, monkeypatch, ckpt)


def resumes_at_the_back_off_from_either_state(repo: Path, tmp_path: Path, monkeypatch, ckpt: dict) -> None:
    """A checkpoint whose backed-off micro-batch is in the OOM callback's events alone (as the step's state did not
    exist), and one whose callback recorded nothing (its step state alone), both resume at micro-batch 1."""
    callback_only = {**ckpt, "codetune": {k: v for k, v in ckpt["codetune"].items() if k != "micro_batches"}}
    step_only = {**ckpt, "callbacks": {k: ({"events": []} if k.startswith("OOMBackoff") else v)
                                       for k, v in ckpt["callbacks"].items()}}
    for name, checkpoint in (("callback-only", callback_only), ("step-only", step_only)):
        torch.save(checkpoint, tmp_path / f"{name}.ckpt")
        resumed = MicroBatchRecorder(monkeypatch)
        build_cli(fit_args(repo, tmp_path, name, "--trainer.max_epochs", "2",
                           "--ckpt_path", str(tmp_path / f"{name}.ckpt")))
        assert resumed.attempts and all(max(len(m) for m in a) == 1 for a in resumed.attempts), name


def test_oom_at_micro_batch_one_stops_with_what_to_change(repo, tmp_path, monkeypatch, capsys):
    """The injector only fires above micro-batch 1, so a real OOM is simulated by patching the forward."""

    oom_in_every_training_forward(monkeypatch)
    assert main(fit_args(repo, tmp_path, "hopeless")) == 2
    err = capsys.readouterr().err
    assert "with a micro-batch of one window of 64 tokens" in err and "--data.seq_len" in err
    assert "--model.gradient_checkpointing true" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "runs" / "hopeless" / "MANIFEST.json").read_text())
    training = manifest["phase_results"]["phase_4_training"]
    assert training["status"] == "failed" and "micro-batch of one window" in training["error"]


def test_without_the_callback_an_oom_is_not_swallowed(repo, tmp_path, monkeypatch):
    oom_in_every_training_forward(monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        build_cli(fit_args(repo, tmp_path, "off", "--oom_backoff.enabled", "false"))


def test_arithmetic_and_injector_parsing():
    assert [halved(m) for m in (8, 5, 2, 1)] == [4, 2, 1, None]
    assert accumulation_steps(16, 4) == 4 and accumulation_steps(16, 3) == 6
    assert InjectedOOM.parse("3") == InjectedOOM(3, None) and InjectedOOM.parse("3@1") == InjectedOOM(3, 1)
    assert InjectedOOM.parse("") is None
    with pytest.raises(ValueError, match="CODETUNE_INJECT_OOM='x'"):
        InjectedOOM.parse("x")
    inject = InjectedOOM(3, 1)
    assert inject.fires(3, 1, 2) and not inject.fires(3, 0, 2) and not inject.fires(3, 1, 1)
    assert not inject.fires(2, 1, 2)


def on_step(micro_batch_size: int) -> SimpleNamespace:
    """A module as the callback sees it: its step, the owner of the micro-batch."""
    return SimpleNamespace(numerics=StepNumerics(micro_batch_size))


class FakeMonitor:
    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.enabled = True

    def used_fraction(self) -> float:
        return self.fraction


def test_proactive_backoff_follows_the_card_fill(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    votes = []

    def vote(decision, all=True):
        votes.append((decision, all))
        return decision

    trainer = SimpleNamespace(global_step=5, loggers=[], strategy=SimpleNamespace(reduce_boolean_decision=vote))
    module = on_step(4)
    batch = {"input_ids": torch.zeros(8, 16)}
    backoff = OOMBackoff(proactive_fraction=0.9)
    backoff._monitor = FakeMonitor(0.5)
    backoff.on_train_batch_start(trainer, module, batch, 0)
    assert module.numerics.micro_batch_size == 4 and not backoff.events
    backoff._monitor.fraction = 0.95
    backoff.on_train_batch_start(trainer, module, batch, 0)
    assert module.numerics.micro_batch_size == 2
    assert backoff.events == [{"step": 5, "micro_batch_size": 2, "gradient_accumulation_steps": 4,
                               "reason": "proactive"}]
    assert votes == [(False, False), (True, False)]  # "any rank": all=False
    module = on_step(1)
    backoff.on_train_batch_start(trainer, module, batch, 0)  # nothing left to halve: no error, no event
    assert module.numerics.micro_batch_size == 1 and len(backoff.events) == 1
    with pytest.raises(ConfigError, match="--oom_backoff.proactive_fraction=1.5"):
        OOMBackoff(proactive_fraction=1.5)


def test_a_rank_without_a_vram_reading_still_votes_every_step(monkeypatch):
    """Under DDP a rank whose monitor is off (no NVML there) must still enter the vote, or the ranks whose
    monitor is on wait in it forever; it votes "not full", and follows a full card elsewhere."""

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    votes, others_full = [], [False, True]

    def vote(decision, all=True):  # this rank's vote, and the any-rank result of a 2-rank job
        votes.append((decision, all))
        return decision or others_full[len(votes) - 1]

    trainer = SimpleNamespace(global_step=3, global_rank=1, loggers=[], callbacks=[],
                              strategy=SimpleNamespace(reduce_boolean_decision=vote))
    module, batch = on_step(4), {"input_ids": torch.zeros(8, 16)}
    backoff = OOMBackoff(proactive_fraction=0.9)
    with pytest.warns(UserWarning) as warned:
        backoff.on_train_start(trainer, module)  # no VRAMMonitor among the callbacks
    backoff.on_train_batch_start(trainer, module, batch, 0)
    assert module.numerics.micro_batch_size == 4
    backoff.on_train_batch_start(trainer, module, batch, 1)
    assert votes == [(False, False), (False, False)], "one vote per step, 'not full'"
    assert module.numerics.micro_batch_size == 2 and backoff.events[0]["reason"] == "proactive"
    assert re.search(r"\[rank: 1\] .*VRAM monitor is off here.*votes 'not full'", str(warned[0].message))
    # Without --oom_backoff.proactive_fraction no rank votes: the same decision on all of them.
    quiet = OOMBackoff()
    quiet.on_train_start(trainer, module)
    quiet.on_train_batch_start(trainer, module, batch, 2)
    assert len(votes) == 2


class ReadingVRAMMonitor(VRAMMonitor):
    """A VRAMMonitor as its setup leaves it on a card with NVML, reading `fraction` of the card used."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.enabled = True
        self.fraction = fraction

    def used_fraction(self) -> float:
        return self.fraction


def proactive_trainer(*callbacks) -> SimpleNamespace:
    """A one-rank trainer whose vote returns this rank's decision."""
    return SimpleNamespace(global_step=4, global_rank=0, loggers=[], callbacks=list(callbacks),
                           strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision))


def test_proactive_mode_reads_the_vram_monitor_it_finds_among_the_callbacks(monkeypatch):
    """The monitor that is on is found wherever it sits, past one that is off (no NVML: its setup left it
    disabled), and its reading decides the back-off; with it, nothing warns."""
    from lightning.pytorch.callbacks import Callback

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    card = ReadingVRAMMonitor(0.5)
    trainer = proactive_trainer(Callback(), VRAMMonitor(), card)
    module, batch = on_step(4), {"input_ids": torch.zeros(8, 16)}
    backoff = OOMBackoff(proactive_fraction=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backoff.on_train_start(trainer, module)
    backoff.on_train_batch_start(trainer, module, batch, 0)
    assert module.numerics.micro_batch_size == 4 and not backoff.events
    card.fraction = 0.95  # the card filled up between two steps
    backoff.on_train_batch_start(trainer, module, batch, 1)
    assert module.numerics.micro_batch_size == 2 and backoff.events[0]["reason"] == "proactive"


@pytest.mark.parametrize("callbacks", [[], [VRAMMonitor()]], ids=["no-monitor", "monitor-off"])
def test_without_a_monitor_that_is_on_proactive_mode_warns_and_waits_for_an_oom(callbacks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    trainer = proactive_trainer(*callbacks)
    module, batch = on_step(4), {"input_ids": torch.zeros(8, 16)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no monitor is needed, so none is missed, without the pro-active mode
        OOMBackoff().on_train_start(trainer, module)
    backoff = OOMBackoff(proactive_fraction=0.9)
    with pytest.warns(UserWarning, match="VRAM monitor is off here"):
        backoff.on_train_start(trainer, module)
    backoff.on_train_batch_start(trainer, module, batch, 0)
    assert module.numerics.micro_batch_size == 4 and not backoff.events


def test_a_resume_keeps_the_backed_off_micro_batch_and_nothing_else():
    trainer = SimpleNamespace(callbacks=[])
    first = OOMBackoff()
    first.on_train_start(trainer, on_step(8))  # a run at 8 that never backed off
    fresh, module = OOMBackoff(), on_step(4)
    fresh.load_state_dict(first.state_dict())
    fresh.on_train_start(trainer, module)
    assert module.numerics.micro_batch_size == 4, "a new --data.batch_size at resume is honoured"
    backed_off = OOMBackoff()
    backed_off.load_state_dict({"events": [{"step": 3, "micro_batch_size": 2, "gradient_accumulation_steps": 8,
                                            "reason": "oom"}]})
    backed_off.on_train_start(trainer, module)
    assert module.numerics.micro_batch_size == 2
    smaller = on_step(1)
    backed_off.on_train_start(trainer, smaller)
    assert smaller.numerics.micro_batch_size == 1
