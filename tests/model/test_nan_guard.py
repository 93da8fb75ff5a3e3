"""NaN/inf guard: a non-finite loss or gradient norm stops the run before the optimizer step, so the weights and
every checkpoint stay the last finite ones and no adapter is exported; a resume at a lower rate goes on."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

import codetune.cli as cli_lib
from codetune.__main__ import main
import codetune.model.module as module_lib
from codetune.errors import NonFiniteLossError, NonFiniteWeightsError
from codetune.model.loading import apply_lora
from codetune.data.tokenizer import train_tokenizer
from codetune.model.tiny import build_tiny_model

NAN_AT = 5  # optimizer step (trainer.global_step) whose loss is poisoned; checkpoints every 2 steps: 2, 4


def fit_args(repo: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """The CLI test's command (the tests' preset, windows of 64), stopping at step 8 unless `extra` says otherwise."""
    from helpers import fit_args as cli_fit_args

    return cli_fit_args(repo, runs, name, "--trainer.max_steps", "8", *extra)


class InfGradient(torch.autograd.Function):
    """Adds nothing to the loss, and an infinite gradient to one tensor: an overflow in backward (float16)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("inf"), device=grad.device, dtype=grad.dtype)


def nan_loss(module, loss_sum: torch.Tensor) -> torch.Tensor:
    return loss_sum * float("nan")


def inf_gradient(module, loss_sum: torch.Tensor) -> torch.Tensor:
    return loss_sum + InfGradient.apply(next(p for p in module.parameters() if p.requires_grad))


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Poisoned:
    """Every training micro-batch of optimizer step `at_step` goes through `poison`; keeps the trainable
    weights as that step began, and (through a callback) those in memory when the run failed."""

    def __init__(self, monkeypatch, at_step: int, poison) -> None:
        self.before_step: dict[str, torch.Tensor] | None = None
        self.at_error: dict[str, torch.Tensor] | None = None
        self.exception: BaseException | None = None
        original_loss_sum = module_lib.CodeLoRAModule.loss_sum
        original_trainer = cli_lib.CodetuneCLI.instantiate_trainer

        def loss_sum(module, batch):
            loss, n = original_loss_sum(module, batch)
            if not torch.is_grad_enabled() or module.trainer.global_step != at_step:
                return loss, n
            if self.before_step is None:
                self.before_step = trainable(module)
            return poison(module, loss), n

        def instantiate_trainer(cli, **kwargs):
            trainer = original_trainer(cli, **kwargs)
            trainer.callbacks.append(_AtError(self))
            return trainer

        monkeypatch.setattr(module_lib.CodeLoRAModule, "loss_sum", loss_sum)
        monkeypatch.setattr(cli_lib.CodetuneCLI, "instantiate_trainer", instantiate_trainer)


class _AtError(Callback):
    def __init__(self, record: Poisoned) -> None:
        self.record = record

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.record.exception = exception
        self.record.at_error = trainable(pl_module)


def run_main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(args)
    return status, err.getvalue()


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def assert_failed_in_training_without_adapter(manifest: dict, run_files: list[str], message: str) -> None:
    assert manifest["status"] == "failed" and manifest["failed_phase"] == "phase_4_training"
    training = manifest["phase_results"]["phase_4_training"]
    assert training["status"] == "failed" and training["error"].startswith(f"NonFiniteLossError: {message}")
    assert "phase_6_export" not in manifest["phase_results"]
    assert not [f for f in run_files if "adapter" in f], "no adapter, not even a temporary one"


def after_the_run(run_dir: Path) -> tuple[dict, list[str]]:
    """The manifest and the names in the run directory (snapshots: a later test resumes the run)."""
    return json.loads((run_dir / "MANIFEST.json").read_text()), sorted(p.name for p in run_dir.iterdir())


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from helpers import write_fixture_repo

    return write_fixture_repo(tmp_path_factory.mktemp("nan") / "repo")


@pytest.fixture(scope="module")
def nan_run(repo) -> SimpleNamespace:
    """A run whose loss is nan at step 5, with checkpoints every 2 steps, as it was when it failed."""
    runs = repo.parent / "runs"
    with pytest.MonkeyPatch.context() as monkeypatch:
        record = Poisoned(monkeypatch, NAN_AT, nan_loss)
        status, err = run_main(fit_args(repo, runs, "nan", "--checkpoint.every_n_train_steps", "2"))
    manifest, run_files = after_the_run(runs / "nan")
    last = runs / "nan" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    return SimpleNamespace(run_dir=runs / "nan", status=status, err=err, record=record, manifest=manifest,
                           run_files=run_files, last=last, ckpt=ckpt)


def test_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(nan_run):
    run_dir, err, record, last = nan_run.run_dir, nan_run.err, nan_run.record, nan_run.last
    assert nan_run.status == 2 and "Traceback" not in err
    assert f"codetune fit: error: training stopped at optimizer step {NAN_AT}: the loss is nan. " in err
    assert "the weights were not updated" in err and f"The last good checkpoint is {last}. " in err
    # An fp32 run on the CPU: nothing about the dtype would help, so nothing is said about it.
    assert "--model.learning_rate (now 0.005)" in err and "--model.dtype" not in err
    assert "--run_name nan --ckpt_path last" in err and f"make resume RUN={run_dir} " in err
    assert isinstance(record.exception, NonFiniteLossError)
    assert_failed_in_training_without_adapter(nan_run.manifest, nan_run.run_files,
                                              f"training stopped at optimizer step {NAN_AT}: the loss is nan")

    # The step was not applied: the weights in memory are exactly those the poisoned step started from.
    assert record.at_error.keys() == record.before_step.keys()
    for name, weight in record.at_error.items():
        assert torch.isfinite(weight).all() and torch.equal(weight, record.before_step[name]), name

    # Nothing was saved after the failure: last.ckpt is the one of step 4, finite through and through.
    ckpt = nan_run.ckpt
    assert ckpt["global_step"] == NAN_AT - 1
    saved = tensors(ckpt["state_dict"]) + tensors(ckpt["optimizer_states"])
    assert len(saved) > 2 * len(ckpt["state_dict"]), "Adam's moments are checked too"
    assert all(torch.isfinite(t).all() for t in saved if t.is_floating_point())


def test_resuming_the_kept_checkpoint_at_a_lower_rate_trains_to_the_end(repo, nan_run):
    """The fix the message gives, in the same run directory: `--ckpt_path last` and a lower rate."""
    run_dir = nan_run.run_dir
    status, err = run_main(fit_args(repo, run_dir.parent, run_dir.name, "--ckpt_path", "last",
                                    "--checkpoint.every_n_train_steps", "2", "--model.learning_rate", "1e-3"))
    assert status == 0, err
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 8
    # The resumed schedule runs at the new peak rate, not the 5e-3 the checkpoint was trained at.
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-3)]
    assert [g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [pytest.approx(1e-3)]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_inf_gradient_with_a_finite_loss_stops_before_any_checkpoint(repo, monkeypatch):
    record = Poisoned(monkeypatch, 1, inf_gradient)
    status, err = run_main(fit_args(repo, repo.parent / "runs", "inf", "--trainer.max_steps", "3"))
    run_dir = repo.parent / "runs" / "inf"
    assert status == 2 and "Traceback" not in err
    expected = "training stopped at optimizer step 1: the gradient norm is inf while the loss is finite ("
    assert f"codetune fit: error: {expected}" in err
    assert "No checkpoint was written yet (--checkpoint_every_n_steps N" in err and "then train again." in err
    assert_failed_in_training_without_adapter(*after_the_run(run_dir), expected)
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))
    for name, weight in record.at_error.items():
        assert torch.isfinite(weight).all() and torch.equal(weight, record.before_step[name]), name


def guarded_module(tmp_path: Path, vote, scaler=None) -> tuple[module_lib.CodeLoRAModule, torch.optim.Optimizer]:
    """A module attached to a stand-in trainer whose strategy votes with `vote`; one weight with gradient (3, 4)."""
    module = module_lib.CodeLoRAModule()
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=vote), global_step=7,
                                     checkpoint_callbacks=[], default_root_dir=str(tmp_path),
                                     precision_plugin=SimpleNamespace(scaler=scaler))
    return module, torch.optim.SGD([weight], lr=0.1)


def test_every_rank_votes_and_all_stop_when_one_is_not_finite(tmp_path):
    votes = []

    def vote(decision: bool, all: bool = True) -> bool:
        votes.append((decision, all))
        return decision

    module, optimizer = guarded_module(tmp_path, vote)
    norm, norm_value = module.finite_grad_norm(torch.tensor(2.0), optimizer)
    assert norm.item() == pytest.approx(5.0) and norm_value == pytest.approx(5.0)
    with pytest.raises(NonFiniteLossError, match="step 7: the loss is inf"):
        module.finite_grad_norm(torch.tensor(float("inf")), optimizer)
    assert votes == [(True, True), (False, True)]  # all=True: every rank must be finite

    another_rank_failed = guarded_module(tmp_path, lambda decision, all=True: False)
    with pytest.raises(NonFiniteLossError,
                       match=r"another rank's loss or gradient norm is not finite \(here: loss 2, gradient norm 5\)"):
        another_rank_failed[0].finite_grad_norm(torch.tensor(2.0), another_rank_failed[1])


def test_a_float16_grad_scaler_skips_infinite_gradients_itself(tmp_path):
    module, optimizer = guarded_module(tmp_path, lambda decision, all=True: decision,
                                       scaler=torch.amp.GradScaler("cpu"))
    optimizer.param_groups[0]["params"][0].grad[0] = float("inf")
    # The scaler's own overflow check skips the step and lowers the scale: no reason to stop the run...
    assert module.finite_grad_norm(torch.tensor(2.0), optimizer)[0].item() == float("inf")
    # ...but a nan loss is divergence whatever the precision.
    with pytest.raises(NonFiniteLossError, match="the loss is nan"):
        module.finite_grad_norm(torch.tensor(float("nan")), optimizer)


def test_save_adapter_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n" * 20], vocab_size=300)
    module = module_lib.CodeLoRAModule()
    module.model = apply_lora(build_tiny_model(tokenizer), 4, 8, 0.0, ["q_proj"], ["lm_head"])
    name, weight = next((n, p) for n, p in module.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=f"not exporting the adapter to {tmp_path / 'adapter'}: 1 "
                                                    f"trainable weight tensor.* \\(the first: {name}\\)"):
        module.save_adapter(tmp_path / "adapter")
    assert not list(tmp_path.iterdir())
    with torch.no_grad():
        weight[0, 0] = 0.0
    module.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_resume_scales_the_restored_schedule_to_the_new_learning_rate():
    def schedule(lr: float):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, 2, 10)

    optimizer, scheduler = schedule(5e-3)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    checkpoint = {"hyper_parameters": {"learning_rate": 5e-3}, "global_step": 4,
                  "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()]}
    module_lib.CodeLoRAModule(learning_rate=1e-3).on_load_checkpoint(checkpoint)
    # What Lightning does on resume: fresh objects from configure_optimizers, then the checkpoint's state.
    resumed_optimizer, resumed_scheduler = schedule(1e-3)
    resumed_optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    resumed_scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    for _ in range(3):
        optimizer.step(), scheduler.step(), resumed_optimizer.step(), resumed_scheduler.step()
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] / 5)
