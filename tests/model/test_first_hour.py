"""What a first `fit` meets on the model side: a model directory that is not a complete model is one error naming
the file and leaves no run directory; a CPU run whose memory plan does not fit the RAM stops before any step;
loading prints no progress bars or deprecation noise; importing the module imports neither peft nor bitsandbytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import codetune.model.module as module_lib
from codetune.__main__ import main
from codetune.memory.units import GiB
from codetune.data.tokenizer import train_tokenizer
from codetune.model.tiny import build_tiny_model

from helpers import TINY_CONFIGS as CONFIGS
from helpers import ROOT


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from helpers import write_fixture_repo

    return write_fixture_repo(tmp_path_factory.mktemp("first-hour") / "repo")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A complete tiny model directory, as save_pretrained writes it."""
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    directory = tmp_path_factory.mktemp("models") / "good"
    build_tiny_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def fit_args(repo: Path, tmp: Path, *extra: str) -> list[str]:
    return ["fit", *CONFIGS, "--data.repo", str(repo), "--runs_dir", str(tmp / "runs"), "--run_name", "first",
            "--data.cache_dir", str(tmp / "token-cache"), "--data.seq_len", "64", "--data.batch_size", "2",
            "--data.gradient_accumulation_steps", "1", "--generation.base_eval", "false",
            "--generation.repo_prompts", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.max_steps", "1", "--checkpoint_every_n_steps", "0",
            *extra]


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _broken_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_')


def _broken_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"version": "1.0", "trunc')


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


@pytest.mark.parametrize(("breaks", "says"), [
    (_no_config, "it has no config.json"),
    (_broken_config, "its config.json is not valid JSON (Unterminated string"),
    (_broken_tokenizer, "its tokenizer.json cannot be parsed (EOF while parsing"),
    (_no_weights, "its weights could not be loaded (Error no file named model.safetensors"),
], ids=["no-config", "broken-config", "broken-tokenizer", "no-weights"])
def test_a_broken_model_directory_is_one_error_and_leaves_no_run(repo, model_dir, tmp_path, capsys, breaks, says):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    breaks(broken)
    assert main(fit_args(repo, tmp_path, "--model.name_or_path", str(broken), "--model.modules_to_save", "[]")) == 2
    err = capsys.readouterr().err
    assert f"--model.name_or_path {str(broken)!r}: " in err and says in err
    assert "Point --model.name_or_path at a complete model directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "first").exists()


def test_a_config_without_model_type_is_named_before_transformers_fails(tmp_path):
    from codetune.data.model_source import config_problem

    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    assert config_problem(tmp_path) == ('its config.json has no "model_type" (transformers cannot tell which '
                                        'architecture it is)')
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert config_problem(tmp_path) is None


def test_a_cpu_plan_larger_than_the_ram_stops_before_any_step(repo, tmp_path, capsys, caplog, monkeypatch):
    # tiny's context follows the window, so only the memory plan can refuse a window of 100,000 tokens.
    monkeypatch.setattr(module_lib, "available_ram_bytes", lambda: 8 * GiB)
    assert main(fit_args(repo, tmp_path, "--data.seq_len", "100000")) == 2
    assert "codetune RAM plan (micro-batch 2" in caplog.text
    assert "does NOT fit in 8.00 GiB of available RAM" in caplog.text
    err = capsys.readouterr().err
    assert "the memory plan does not fit this machine's RAM: micro-batch 2 x 100000 tokens" in err
    assert "and 8.00 GiB are available" in err and "Lower --data.seq_len (now 100000)" in err
    assert "--data.batch_size (now 2)" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "first").exists()


def test_available_ram_is_linux_mem_available(tmp_path):
    from codetune.memory.ram import available_ram_bytes

    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2097152 kB\n")
    assert available_ram_bytes(tmp_path / "meminfo") == 2 * GiB
    assert available_ram_bytes(tmp_path / "missing") is None
    if Path("/proc/meminfo").exists():
        assert 0 < available_ram_bytes() < 2**50


def test_a_tiny_cpu_fit_prints_no_loading_noise_and_a_ram_plan(repo, tmp_path):
    from helpers import subprocess_env

    args = [sys.executable, "-m", "codetune", *fit_args(repo, tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for noise in ("Loading weights", "Writing model shards", "is_gradient_checkpointing", "gemm_4bit_forward",
                  "VRAMMonitor is off", "cuda context", "0.00 GiB"):
        assert noise not in out, noise
    assert "codetune RAM plan (micro-batch 2" in out and "fits in" in out and "of available RAM" in out
    assert "codetune model: tiny," in out


def test_importing_the_module_imports_neither_peft_nor_bitsandbytes():
    code = ("import sys, codetune.model.module, codetune.data.tokens; "
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_cpu_plan_names_ram_in_mib_without_zero_rows():
    from codetune.memory.estimate import plan_memory
    from codetune.memory.report import format_plan
    from codetune.memory.shapes import ModelShape, TrainingShape

    shape = ModelShape(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    plan = plan_memory(shape, TrainingShape(seq_len=64, micro_batch_size=2, quantization="none", compute_dtype_bytes=4,
                                            lora_dropout=0.0, device="cpu"))
    text = format_plan(plan, 4 * GiB)
    assert "cuda context" not in text and "4-bit" not in text and "autocast" not in text and "0.00" not in text
    assert f" {plan.total / 2**20:.2f} MiB  (* only the largest counts)" in text
    assert plan.required_ram_bytes() == 2 * plan.to_allocate_after_load + 256 * 2**20
    assert f"fits in 4.00 GiB of available RAM: needs {plan.required_ram_bytes() / GiB:.2f} GiB" in text


def test_lora_on_a_tiny_model_raises_no_deprecation_warning(recwarn):
    from codetune.model.loading import apply_lora

    tokenizer = train_tokenizer(["x = 1\n"] * 10, vocab_size=300)
    apply_lora(build_tiny_model(tokenizer), 4, 8, 0.0, ["q_proj"])
    assert [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_only_the_missing_kernels_line_of_bitsandbytes_is_dropped(caplog):
    import importlib
    import logging

    importlib.import_module("codetune.model.loading")  # installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logger.warning("bitsandbytes: something the user must fix")
    assert [r.getMessage() for r in caplog.records] == ["bitsandbytes: something the user must fix"]


def test_weight_bars_are_off_while_loading_and_download_bars_stay():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from codetune.model.loading import quiet_weight_bars

    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with quiet_weight_bars():
        assert not hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
