"""bench/gpu_check.py: its arithmetic, and its whole run on CPU (`--dry-run`), so the GPU check cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import load_gpu_check

ROOT = Path(__file__).resolve().parents[1]


gpu_check = load_gpu_check()


def test_flops_per_token_of_a_frozen_base_lora_step_by_hand():
    config = dict(gpu_check.TINY_QWEN2)  # h 64, i 128, 2 layers, 4 heads of 16 (2 KV), V 1024
    # Per layer: q, o 64x64; k, v 64x32; gate, up, down 64x128 -> 36,864 weights; 2 layers: N = 73,728.
    n, head = 73_728, 1024 * 64
    attention = 2 * 2 * 4 * 16 * 64  # causal QK^T and AV over a 64-token window, forward
    lora = 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r (in + out) per adapted projection, r = 8
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model, hardware = gpu_check.flops_per_token(config, 64, 8, targets, checkpointing=True, chunked_loss=True)
    assert model == 4 * n + 4 * head + 3 * attention + 6 * lora == 704_512
    assert hardware == model + 2 * head + (2 * n + attention + 2 * lora) == 1_032_192
    plain, same = gpu_check.flops_per_token(config, 64, 8, targets, checkpointing=False, chunked_loss=False)
    assert plain == same == model


def test_peaks_by_device_name_and_unknown_cards():
    assert gpu_check.peak_tflops("NVIDIA H200")[0] == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 2060")[0] == 51.6
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090")[0] == 165.2
    assert gpu_check.peak_tflops("AMD Instinct MI300X") is None and gpu_check.peak_tflops(None) is None


def test_segments_verdicts_and_the_oom_cap():
    from codetune.memory_plan import CUDA_CONTEXT_BYTES

    # Two files and the start of a third, then padding (position 0, not real).
    positions = np.array([0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0])
    assert gpu_check.file_segments(positions, n_real=9) == [(0, 3), (3, 5), (5, 9)]
    assert gpu_check.loss_verdict([3.0, 2.5, 2.0]) == (True, True)
    assert gpu_check.loss_verdict([3.0, 3.1]) == (True, False)
    assert gpu_check.loss_verdict([3.0, float("nan")]) == (False, False)
    assert gpu_check.loss_verdict([3.0, None]) == (False, False)
    gib = gpu_check.GiB
    assert gpu_check.plan_cap_between(4 * gib, 6 * gib) == 5 * gib - CUDA_CONTEXT_BYTES
    assert gpu_check.plan_cap_between(4 * gib, 6 * gib, 0.5) == (5 * gib - CUDA_CONTEXT_BYTES) // 2


def test_measured_peaks_in_gb_against_a_plan_in_gib():
    # The VRAM monitor writes GB (10**9), the plan GiB (2**30); the plan's context term is not torch's to allocate.
    vram = {"peak_torch_allocated_gb": 4.6 * 2**30 / 1e9, "peak_torch_reserved_gb": 4.8 * 2**30 / 1e9,
            "peak_vram_gb": 5.4 * 2**30 / 1e9, "device_name": "NVIDIA H200"}
    figures = gpu_check.memory_figures(vram, {"predicted_peak_gib": 5.4, "terms_gib": {"cuda_context": 0.4}})
    assert figures["peak_allocated_gib"] == pytest.approx(4.6) and figures["peak_nvml_gib"] == pytest.approx(5.4)
    assert figures["plan_ratio"] == pytest.approx(0.92) and figures["plan_within_10pct"]
    assert not gpu_check.memory_figures({**vram, "peak_torch_allocated_gb": 4.4 * 2**30 / 1e9},
                                        {"predicted_peak_gib": 5.4, "terms_gib": {"cuda_context": 0.4}})[
        "plan_within_10pct"]
    assert "plan_ratio" not in gpu_check.memory_figures({}, {"predicted_peak_gib": 5.4})


def test_a_fit_goes_through_the_cli_with_the_common_flags_and_the_recorder(tmp_path):
    from codetune.cli import build_cli

    mode = gpu_check.dry_mode(6.0)
    (tmp_path / "corpus").mkdir()
    ctx = gpu_check.Context(mode=mode, work=tmp_path, model_dir=tmp_path / "model", corpus=tmp_path / "corpus",
                            context_bytes=0)
    spec = gpu_check.FitSpec("x", gpu_check.RUST_CONFIG, overrides={"model.lora_dropout": "0.0"}, steps=2)
    args = gpu_check.fit_args(ctx, spec)
    assert args[:3] == ["fit", "--config", str(gpu_check.RUST_CONFIG)]
    for flag, value in gpu_check.COMMON_FIT_FLAGS.items():
        assert args[args.index(f"--{flag}") + 1] == value
    assert args[args.index("--data.seq_len") + 1] == "64" and args[args.index("--model.lora_dropout") + 1] == "0.0"
    assert "StepRecorder" in args[-1]
    # Every flag parses against today's CLI (parse only: nothing is trained).
    parsed = build_cli(args[1:], run=False)
    assert parsed.datamodule.seq_len == 64 and parsed.model.hparams.lora_dropout == 0.0
    # The effective settings: the module's defaults, then the YAML, then the overrides.
    settings = spec.settings()
    assert settings["model.lora_rank"] == 16 and settings["model.gradient_checkpointing"] is True
    assert settings["model.lora_dropout"] == 0.0 and settings["model.loss_chunk_size"] == 1024


def test_on_a_6_gib_card_the_real_configs_get_the_largest_micro_batch_the_plan_fits(tmp_path):
    from codetune.memory_plan import plan_memory

    mode = gpu_check.real_mode(6.0)
    context = int(0.5 * gpu_check.GiB)
    ctx = gpu_check.Context(mode=mode, work=tmp_path, model_dir=tmp_path, corpus=tmp_path, context_bytes=context)
    free = 6 * gpu_check.GiB - context
    shape = gpu_check.model_shape(mode.model_config)
    for config in (gpu_check.RUST_CONFIG, gpu_check.DEFAULT_CONFIG):
        spec, note = gpu_check.fit_on_card(gpu_check.FitSpec("x", config), ctx, (9, 0))
        micro = int(spec.overrides["data.batch_size"])
        assert micro * int(spec.overrides["data.gradient_accumulation_steps"]) == gpu_check.EFFECTIVE_BATCH
        assert spec.cap_bytes == free and f"{micro} x " in note
        card = 6 * gpu_check.GiB  # the plans count the CUDA context; the allocator cap (free) does not
        assert plan_memory(shape, gpu_check.planned_shape(spec, mode, (9, 0))).fits(card)
        if micro < gpu_check.EFFECTIVE_BATCH:  # the next larger micro-batch would not fit
            larger = replace(spec, overrides={**spec.overrides, "data.batch_size": str(2 * micro)})
            assert not plan_memory(shape, gpu_check.planned_shape(larger, mode, (9, 0))).fits(card)
    assert shape.vocab_size == 151_936 and shape.num_hidden_layers == 28 and shape.head_size == 128


def rows_by_check(document: dict) -> dict[tuple[str, str], dict]:
    return {(row["section"], row["check"]): row for row in document["rows"]}


@pytest.mark.slow
def test_dry_run_runs_every_section_on_cpu_and_reports_numbers(tmp_path):
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "codetune GPU check (dry run, CPU" in proc.stdout and "FAIL" not in proc.stdout
    document = json.loads(out.read_text())
    rows = rows_by_check(document)
    assert {r["section"] for r in document["rows"]} == {"setup", "a", "b", "c", "d", "e", "f"}
    assert not [r for r in document["rows"] if r["status"] == "FAIL"]

    vocab = rows[("setup", "token ids < model vocabulary")]["figures"]
    assert vocab["max_token_id"] < vocab["vocab_size"] == 1024
    setup = rows[("setup", "random model, tokenizer, corpus")]["figures"]
    assert setup["tokenizer_tokens"] == 512 < setup["vocab_size"]

    for label, micro, accumulation, checkpointing in (("rust", 4, 4, True), ("default", 8, 2, False)):
        row = rows[("a", f"{label} config as shipped, whole card")]
        figures = row["figures"]
        assert row["status"] == "pass"
        assert (figures["micro_batch_size"], figures["gradient_accumulation_steps"]) == (micro, accumulation)
        assert figures["seq_len"] == 64 and figures["gradient_checkpointing"] is checkpointing
        assert len(figures["losses"]) == 3 and all(math.isfinite(x) for x in figures["losses"])
        # A random 1,024-token model starts near ln(1024) and the held-out loss, on the same windows, falls.
        assert abs(figures["losses"][0] - math.log(1024)) < 0.1
        assert figures["held_out_loss_tuned"] < figures["held_out_loss_base"]
        assert figures["tokens_per_s"] > 0 and figures["oom_backoffs"] == []
        assert rows[("a", f"{label} config on a 6 GiB card")]["status"] == gpu_check.NEEDS_CUDA

    oom = rows[("b", "OOM at micro-batch 4 recovered")]
    assert oom["status"] == "pass"
    assert oom["figures"]["oom_backoffs"] == [{"step": 0, "micro_batch_size": 2, "gradient_accumulation_steps": 8,
                                               "reason": "oom"}]
    assert oom["figures"]["micro_batch_sizes"] == [2, 2, 2]
    assert oom["figures"]["final_loss_rel_diff"] <= 1e-5 and oom["figures"]["adapter_max_abs_diff"] <= 1e-5

    assert rows[("c", "Turing (7.5): auto dtype and precision")]["status"] == "pass"
    precision = rows[("c", "bfloat16 vs float32: adapter updates")]["figures"]
    assert (precision["precision"], precision["reference_precision"]) == ("bf16-mixed", "32-true")
    assert abs(precision["update_ratio"] - 1) <= 0.1 and precision["update_cosine"] >= 0.9
    assert precision["update_norm"] > 0 and precision["grad_scaler_scale"] is None

    for attn in ("sdpa", "eager"):
        isolation = rows[("d", f"isolation, 3 windows of 64, {attn}")]
        assert isolation["status"] == "pass" and isolation["figures"]["segments"] >= 6
        assert isolation["figures"]["rel_diff"] <= 1e-4 and isolation["figures"]["control_rel_diff"] > 1e-2
    assert rows[("d", "isolation, 3 windows of 64, flash_attention_2")]["status"] == gpu_check.NEEDS_CUDA

    generate = rows[("e", "codetune generate (unquantized, cpu)")]["figures"]
    assert generate["exit_status"] == 0 and generate["output"].startswith("def analyze_")
    merge = rows[("e", "codetune merge (float32) = base + adapter")]
    assert merge["status"] == "pass" and merge["figures"]["rel_diff"] <= 1e-4
    assert merge["figures"]["adapter_effect_rel"] > 1e3 * merge["figures"]["rel_diff"]
    assert rows[("f", "pytest -m gpu tests/gpu")]["status"] == gpu_check.NEEDS_CUDA
