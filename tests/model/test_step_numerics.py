"""The optimizer step on the paths a consumer card takes, emulated on the CPU: fp16 with a real GradScaler, the
dtype a Turing card gets, precision flags that disagree, a resume whose adapter does not fit, and OOMs outside
forward/backward (the optimizer step, cuBLAS, validation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import codetune.model.module as module_lib
from codetune.cli import derived_precision
from codetune.__main__ import main
from codetune.errors import ConfigError
from codetune.model.loading import check_precision, resolve_dtype

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(ROOT / "configs" / "training_config.yaml"),
           "--config", str(ROOT / "tests" / "tiny.yaml")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from helpers import write_fixture_repo

    return write_fixture_repo(tmp_path_factory.mktemp("numerics") / "repo")


def fit_args(repo: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    # No dropout (runs compared weight for weight), no eval generation, no base eval: the step alone.
    return ["fit", *CONFIGS, "--data.repo", str(repo), "--runs_dir", str(tmp / "runs"), "--run_name", name,
            "--data.cache_dir", str(tmp / "token-cache"), "--data.seq_len", "64", "--data.batch_size", "2",
            "--data.gradient_accumulation_steps", "2", "--model.lora_dropout", "0.0", "--model.modules_to_save", "[]",
            "--generation.base_eval", "false", "--generation.repo_prompts", "0", "--generation.max_new_tokens", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "0",
            "--trainer.callbacks+=probes.StepLog", *extra]


def steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps_rank0.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_fp16_with_a_real_grad_scaler_steps_like_fp32(repo, tmp_path):
    assert main(fit_args(repo, tmp_path, "fp32")) == 0
    # Lightning's 16-mixed with torch's GradScaler (init scale 2**16), on the CPU; the base computes in float16.
    assert main(fit_args(repo, tmp_path, "fp16", "--model.dtype", "float16",
                         "--trainer.plugins", "probes.CPUFloat16Precision")) == 0
    full, half = steps(tmp_path / "runs" / "fp32"), steps(tmp_path / "runs" / "fp16")
    assert [s["step"] for s in half] == [1, 2, 3, 4] and half[-1]["skipped"] == 0
    # The norm the guard reads and clips with is the unscaled one (clipped before unscaling it was ~65536x).
    for a, b in zip(full, half):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    w32, w16 = adapter(tmp_path / "runs" / "fp32"), adapter(tmp_path / "runs" / "fp16")
    # LoRA B starts at zero, so B is the update itself: fp16 training moved it as fp32 training did.
    for key in (k for k in w32 if "lora_B" in k):
        update = w32[key].norm()
        assert update > 1e-3, "training moved the weights (the comparison is not vacuous)"
        assert (w16[key].float() - w32[key]).norm() / update < 0.02, key
    assert {t.dtype for t in w16.values()} == {torch.float32}, "LoRA weights stay fp32 under 16-mixed"


def test_steps_the_scaler_skips_are_counted_and_change_nothing(repo, tmp_path):
    # A scale so large that the first backwards overflow float16: the scaler skips those steps and halves itself.
    assert main(fit_args(repo, tmp_path, "skip", "--model.dtype", "float16", "--trainer.plugins",
                         json.dumps({"class_path": "probes.CPUFloat16Precision",
                                     "init_args": {"init_scale": 2.0 ** 40}}))) == 0
    run = steps(tmp_path / "runs" / "skip")
    skipped = run[-1]["skipped"]
    assert skipped >= 1 and all(s["skipped"] >= 1 for s in run[:skipped])
    manifest = json.loads((tmp_path / "runs" / "skip" / "MANIFEST.json").read_text())
    assert manifest["phase_results"]["phase_4_training"]["training_stats"]["skipped_steps"] == skipped
    assert manifest["status"] == "completed"


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((6, 1), torch.float16),
                                                       ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16)])
def test_auto_dtype_follows_the_compute_capability_not_emulated_bf16(monkeypatch, capability, expected):
    # torch says bf16 is supported on Turing (by emulation); auto must not take that.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", "cuda", capability) == expected
    assert resolve_dtype("auto", "cpu", None) == torch.float32


def test_the_trainer_precision_is_derived_from_the_dtype_on_a_turing_card(monkeypatch):
    from jsonargparse import Namespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))

    def config(dtype, accelerator="auto"):
        return Namespace(model=Namespace(dtype=dtype), trainer=Namespace(accelerator=accelerator, devices="auto"))

    assert derived_precision(config("auto")) == "16-mixed"  # RTX 2060: fp16 autocast with a GradScaler
    assert derived_precision(config("bfloat16")) == "bf16-mixed"
    assert derived_precision(config("auto", accelerator="cpu")) == "32-true"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert derived_precision(config("auto")) == "bf16-mixed"


def test_contradictory_dtype_and_precision_is_one_error(repo, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--trainer.precision bf16-true"):
        check_precision(torch.bfloat16, "bfloat16", "bf16-true")
    check_precision(torch.float32, "auto", "32-true")
    # bf16-true would cast the fp32 LoRA weights to bf16.
    assert main(fit_args(repo, tmp_path, "bad", "--model.dtype", "bfloat16", "--trainer.precision", "bf16-true")) == 2
    err = capsys.readouterr().err
    assert "--model.dtype bfloat16" in err and "--trainer.precision bf16-mixed" in err and "Traceback" not in err
    # float16 on the CPU: Lightning would train 16-mixed as bf16-mixed, so the pair is refused before loading.
    assert main(fit_args(repo, tmp_path, "cpu16", "--model.dtype", "float16")) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_resume_with_other_lora_targets_is_refused(repo, tmp_path, capsys):
    args = fit_args(repo, tmp_path, "targets", "--model.lora_target_modules", "[q_proj]",
                    "--checkpoint_every_n_steps", "1", "--trainer.max_steps", "2")
    assert main(args) == 0
    resume = fit_args(repo, tmp_path, "targets", "--model.lora_target_modules", "[v_proj]",
                      "--trainer.max_steps", "3", "--ckpt_path", "last")
    # Before: strict_loading=False loaded nothing and silently trained a fresh v_proj adapter.
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "--model.lora_target_modules ['q_proj'] in the checkpoint, ['v_proj'] now" in err
    assert "Traceback" not in err


def test_oom_in_the_optimizer_step_stops_with_one_message(repo, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", out_of_memory)
    assert main(fit_args(repo, tmp_path, "optim")) == 2
    err = capsys.readouterr().err
    assert "out of device memory in the optimizer step at step 0" in err and "--model.lora_rank" in err
    assert "MiB with adamw for" in err and "--model.optimizer adamw_8bit (" in err
    assert "Traceback" not in err


def test_a_cublas_allocation_failure_backs_off_like_an_oom(repo, tmp_path, monkeypatch):
    assert main(fit_args(repo, tmp_path, "clean")) == 0
    original = module_lib.CodeLoRAModule.loss_sum
    fired = []

    def cublas_fails_once(self, batch):
        if torch.is_grad_enabled() and self.trainer.global_step == 1 and not fired:
            fired.append(True)
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return original(self, batch)

    monkeypatch.setattr(module_lib.CodeLoRAModule, "loss_sum", cublas_fails_once)
    with pytest.warns(UserWarning, match="out of device memory at step 1 with micro-batch 2"):
        assert main(fit_args(repo, tmp_path, "cublas")) == 0
    clean, backed_off = adapter(tmp_path / "runs" / "clean"), adapter(tmp_path / "runs" / "cublas")
    # Equal up to float summation order (micro-batches of 1 instead of 2), far below what training moved.
    assert max((clean[k] - backed_off[k]).abs().max().item() for k in clean) < 1e-4
    assert max(clean[k].abs().max().item() for k in clean if "lora_B" in k) > 1e-2
    # Any other RuntimeError is not an OOM: it is raised as it is.
    monkeypatch.setattr(module_lib.CodeLoRAModule, "loss_sum",
                        lambda self, batch: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(fit_args(repo, tmp_path, "other"))


def test_validation_backs_off_on_oom_and_measures_the_same_loss(repo, tmp_path, monkeypatch):
    assert main(fit_args(repo, tmp_path, "val-clean")) == 0
    original = module_lib.CodeLoRAModule.loss_sum

    def oom_above_one_window(self, batch):
        if not torch.is_grad_enabled() and batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(module_lib.CodeLoRAModule, "loss_sum", oom_above_one_window)
    assert main(fit_args(repo, tmp_path, "val-oom")) == 0
    stats = [json.loads((tmp_path / "runs" / name / "MANIFEST.json").read_text())
             ["phase_results"]["phase_4_training"]["training_stats"] for name in ("val-clean", "val-oom")]
    assert stats[0]["final_val_loss"] is not None
    assert stats[1]["final_val_loss"] == pytest.approx(stats[0]["final_val_loss"], rel=1e-5)


def test_resume_on_a_changed_base_is_refused(repo, tmp_path, capsys):
    from codetune.model.revision import local_fingerprint

    assert main(fit_args(repo, tmp_path, "base", "--checkpoint_every_n_steps", "1", "--trainer.max_steps", "2")) == 0
    run_dir = tmp_path / "runs" / "base"
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    recorded = manifest["phase_results"]["phase_3_model"]["base_revision"]
    assert recorded["kind"] == "local" and recorded["revision"] == local_fingerprint(run_dir / "base_model")["revision"]
    config = run_dir / "base_model" / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "rms_norm_eps": values["rms_norm_eps"] * 10}))  # another base
    assert main(fit_args(repo, tmp_path, "base", "--trainer.max_steps", "3", "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    assert "the base model changed since this run was trained (config.json changed)" in err
    assert "Traceback" not in err
