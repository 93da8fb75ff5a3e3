"""bench/gpu_check.py: its arithmetic, and its whole run on CPU (`--dry-run`), so the GPU check cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import load_gpu_check

ROOT = Path(__file__).resolve().parents[2]

# The script puts bench/ on sys.path, where its package gpucheck lives.
load_gpu_check()

from codetune.memory.units import GiB  # noqa: E402
from gpucheck.arithmetic import (  # noqa: E402
    file_segments, flops_per_token, loss_verdict, memory_figures, model_shape, peak_tflops, plan_cap_between,
)
from gpucheck.budget import Budget, BudgetSpent  # noqa: E402
from gpucheck.command import parse_args  # noqa: E402
from gpucheck.fits import Context, budgeted, fit_args  # noqa: E402
from gpucheck.planning import fit_on_card, planned_shape  # noqa: E402
from gpucheck.report import Report  # noqa: E402
from gpucheck.row import NEEDS_CUDA, PASS, SKIPPED_BUDGET, Row  # noqa: E402
from gpucheck.sections import SECTIONS, run_section  # noqa: E402
from gpucheck.settings import (  # noqa: E402
    COMMON_FIT_FLAGS, DEFAULT_BUDGET_S, DEFAULT_CONFIG, EFFECTIVE_BATCH, RUST_CONFIG, SECTION_BUDGET_S, SECTION_TITLES,
    TINY_QWEN2, FitSpec, dry_mode, real_mode,
)


def test_flops_per_token_of_a_frozen_base_lora_step_by_hand():
    config = dict(TINY_QWEN2)  # h 64, i 128, 2 layers, 4 heads of 16 (2 KV), V 1024
    # Per layer: q, o 64x64; k, v 64x32; gate, up, down 64x128 -> 36,864 weights; 2 layers: N = 73,728.
    n, head = 73_728, 1024 * 64
    attention = 2 * 2 * 4 * 16 * 64  # causal QK^T and AV over a 64-token window, forward
    lora = 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r (in + out) per adapted projection, r = 8
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model, hardware = flops_per_token(config, 64, 8, targets, checkpointing=True, chunked_loss=True)
    assert model == 4 * n + 4 * head + 3 * attention + 6 * lora == 704_512
    assert hardware == model + 2 * head + (2 * n + attention + 2 * lora) == 1_032_192
    plain, same = flops_per_token(config, 64, 8, targets, checkpointing=False, chunked_loss=False)
    assert plain == same == model


def test_peaks_by_device_name_and_unknown_cards():
    assert peak_tflops("NVIDIA H200")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak_tflops("NVIDIA GeForce RTX 2060")[0] == 51.6
    assert peak_tflops("NVIDIA GeForce RTX 4090")[0] == 165.2
    assert peak_tflops("AMD Instinct MI300X") is None and peak_tflops(None) is None


def test_segments_verdicts_and_the_oom_cap():
    from codetune.memory.persistent import CUDA_CONTEXT_BYTES

    # Two files and the start of a third, then padding (position 0, not real).
    positions = np.array([0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0])
    assert file_segments(positions, n_real=9) == [(0, 3), (3, 5), (5, 9)]
    assert loss_verdict([3.0, 2.5, 2.0]) == (True, True)
    assert loss_verdict([3.0, 3.1]) == (True, False)
    assert loss_verdict([3.0, float("nan")]) == (False, False)
    assert loss_verdict([3.0, None]) == (False, False)
    assert plan_cap_between(4 * GiB, 6 * GiB) == 5 * GiB - CUDA_CONTEXT_BYTES
    assert plan_cap_between(4 * GiB, 6 * GiB, 0.5) == (5 * GiB - CUDA_CONTEXT_BYTES) // 2


def test_measured_peaks_in_gb_against_a_plan_in_gib():
    # The VRAM monitor writes GB (10**9), the plan GiB (2**30); the plan's context term is not torch's to allocate.
    vram = {"peak_torch_allocated_gb": 4.6 * 2**30 / 1e9, "peak_torch_reserved_gb": 4.8 * 2**30 / 1e9,
            "peak_vram_gb": 5.4 * 2**30 / 1e9, "device_name": "NVIDIA H200"}
    figures = memory_figures(vram, {"predicted_peak_gib": 5.4, "terms_gib": {"cuda_context": 0.4}})
    assert figures["peak_allocated_gib"] == pytest.approx(4.6) and figures["peak_nvml_gib"] == pytest.approx(5.4)
    assert figures["plan_ratio"] == pytest.approx(0.92) and figures["plan_within_10pct"]
    assert not memory_figures({**vram, "peak_torch_allocated_gb": 4.4 * 2**30 / 1e9},
                              {"predicted_peak_gib": 5.4, "terms_gib": {"cuda_context": 0.4}})[
        "plan_within_10pct"]
    assert "plan_ratio" not in memory_figures({}, {"predicted_peak_gib": 5.4})


def model_dir_for_parsing(path: Path) -> None:
    """A model directory as far as parsing fit's flags looks at it (its config.json names the architecture)."""
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')


def test_a_fit_goes_through_the_cli_with_the_common_flags_and_the_recorder(tmp_path):
    from codetune.cli import build_cli

    mode = dry_mode(6.0)
    (tmp_path / "corpus").mkdir()
    model_dir_for_parsing(tmp_path / "model")
    ctx = Context(mode=mode, work=tmp_path, model_dir=tmp_path / "model", corpus=tmp_path / "corpus",
                  context_bytes=0)
    spec = FitSpec("x", RUST_CONFIG, overrides={"model.lora_dropout": "0.0"}, steps=2)
    args = fit_args(ctx, spec)
    assert args[:3] == ["fit", "--config", str(RUST_CONFIG)]
    for flag, value in COMMON_FIT_FLAGS.items():
        assert args[args.index(f"--{flag}") + 1] == value
    assert args[args.index("--data.seq_len") + 1] == "64" and args[args.index("--model.lora_dropout") + 1] == "0.0"
    assert args[-1].startswith("--trainer.callbacks+=")
    assert json.loads(args[-1].split("=", 1)[1])["class_path"] == "gpucheck.recorder.StepRecorder"
    # Every flag parses against today's CLI (parse only: nothing is trained).
    parsed = build_cli(args[1:], run=False)
    assert parsed.datamodule.seq_len == 64 and parsed.model.hparams.lora_dropout == 0.0
    # The effective settings: the module's defaults, then the YAML, then the overrides.
    settings = spec.settings()
    assert settings["model.lora_rank"] == 16 and settings["model.gradient_checkpointing"] is True
    assert settings["model.lora_dropout"] == 0.0 and settings["model.loss_chunk_size"] == 1024


@pytest.mark.parametrize("config", [RUST_CONFIG, DEFAULT_CONFIG], ids=["RUST_CONFIG", "DEFAULT_CONFIG"])
def test_the_common_flags_turn_every_generation_off_but_keep_the_base_held_out_loss(tmp_path, config):
    from codetune.callbacks.generation_eval import GenerationEval
    from codetune.cli import build_cli

    model_dir_for_parsing(tmp_path / "model")
    ctx = Context(mode=dry_mode(6.0), work=tmp_path, model_dir=tmp_path / "model", corpus=tmp_path,
                  context_bytes=0)
    # The shipped YAMLs ask for language prompts and the callback's defaults for repo and FIM prompts: the flags
    # must override all three, or a random model's completions run to the token cap in every fit.
    spec = FitSpec("x", config)
    parsed = build_cli(fit_args(ctx, spec)[1:], run=False)
    (generation,) = [c for c in parsed.trainer.callbacks if isinstance(c, GenerationEval)]
    assert generation.prompts == []
    assert generation.n_repo_prompts == 0 and generation.n_fim_prompts == 0
    assert generation.base_eval is True


def test_on_a_6_gib_card_the_real_configs_get_the_largest_micro_batch_the_plan_fits(tmp_path):
    from codetune.memory.estimate import plan_memory

    mode = real_mode(6.0)
    context = int(0.5 * GiB)
    ctx = Context(mode=mode, work=tmp_path, model_dir=tmp_path, corpus=tmp_path, context_bytes=context)
    free = 6 * GiB - context
    shape = model_shape(mode.model_config)
    for config in (RUST_CONFIG, DEFAULT_CONFIG):
        spec, note = fit_on_card(FitSpec("x", config), ctx, (9, 0))
        micro = int(spec.overrides["data.batch_size"])
        assert micro * int(spec.overrides["data.gradient_accumulation_steps"]) == EFFECTIVE_BATCH
        assert spec.cap_bytes == free and f"{micro} x " in note
        card = 6 * GiB  # the plans count the CUDA context; the allocator cap (free) does not
        assert plan_memory(shape, planned_shape(spec, mode, (9, 0))).fits(card)
        if micro < EFFECTIVE_BATCH:  # the next larger micro-batch would not fit
            larger = replace(spec, overrides={**spec.overrides, "data.batch_size": str(2 * micro)})
            assert not plan_memory(shape, planned_shape(larger, mode, (9, 0))).fits(card)
    assert shape.vocab_size == 151_936 and shape.num_hidden_layers == 28 and shape.head_size == 128


def test_the_script_imports_its_package_from_any_directory_and_keeps_its_flags(tmp_path):
    # Run as the GPU lenders tell users to, but from elsewhere: the script finds bench/gpucheck/ by its own path.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "The GPU check: what codetune promises on a small card" in proc.stdout
    for flag in ("--dry-run", "--out", "--sections", "--budget-s", "--card-gib", "--corpus", "--keep"):
        assert flag in proc.stdout


def test_the_flags_name_what_is_wrong(capsys):
    assert parse_args(["--dry-run", "--sections", "a,d"]).sections == ["a", "d"]
    with pytest.raises(SystemExit) as exited:
        parse_args(["--dry-run", "--sections", "a,x"])
    assert exited.value.code == 2 and "--sections ['x']: use letters of tabcdef" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dry-run", "--budget-s", "0"])
    assert "--budget-s 0: must be a positive number of seconds" in capsys.readouterr().err


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_every_section_has_a_title_and_a_budget_share_that_add_up_to_the_default():
    assert list(SECTIONS) == list(SECTION_TITLES) == list(SECTION_BUDGET_S)
    assert sum(SECTION_BUDGET_S.values()) == DEFAULT_BUDGET_S == 480


def test_the_budget_shares_the_total_and_says_why_a_unit_is_not_run():
    clock = FakeClock()
    every = Budget.shared(480, list("tabcdef"), clock=clock)
    assert every.caps_s == SECTION_BUDGET_S
    # A subset shares the whole total in the same proportions (a 170 : d 35).
    assert Budget.shared(205, ["a", "d"], clock=clock).caps_s == {"a": 170.0, "d": 35.0}

    budget = Budget.shared(480, list("tabcdef"), clock=clock)
    budget.start("a")
    clock.advance(169.5)
    budget.check("fit a-rust-card")  # half a second left: a unit may still start
    assert budget.left_s() == pytest.approx(0.5)
    clock.advance(60.5)  # the fit ran past the cap: nothing stops a fit
    with pytest.raises(BudgetSpent) as spent:
        budget.check("fit a-default-shipped")
    row = budget.skipped_row("default config as shipped, whole card", spent.value)
    assert (row.section, row.status) == ("a", SKIPPED_BUDGET)
    assert row.measured == "section a cap 170 s, 230 s spent; not run: fit a-default-shipped"
    assert row.criterion == "--budget-s 480: this section's share 170 s"
    assert row.figures["cap_s"] == 170 and row.figures["spent_s"] == pytest.approx(230)
    assert budget.finish() == pytest.approx(230)
    report = budget.report()
    assert report["sections"]["a"] == {"cap_s": 170, "spent_s": pytest.approx(230), "hit": True,
                                       "not_run": ["fit a-default-shipped"]}
    assert report["sections"]["b"] == {"cap_s": 60, "spent_s": None, "hit": False, "not_run": []}


def test_a_section_over_its_cap_skips_the_rest_and_the_spent_total_skips_later_sections(tmp_path, monkeypatch):
    clock = FakeClock()
    ctx = Context(mode=dry_mode(6.0), work=tmp_path, model_dir=tmp_path, corpus=tmp_path,
                  context_bytes=0, budget=Budget(330, {"a": 200, "b": 70, "c": 60}, clock))

    def section_of_slow_rows(name: str, seconds: float):
        def make_row(check: str) -> Row:
            clock.advance(seconds)
            return Row(name, check, PASS)

        return lambda ctx: [budgeted(ctx, f"row {i}", lambda i=i: make_row(f"row {i}")) for i in range(3)]

    def never_called(ctx):
        raise AssertionError("a section started after the total budget was spent")

    monkeypatch.setitem(SECTIONS, "a", section_of_slow_rows("a", 120))
    monkeypatch.setitem(SECTIONS, "b", section_of_slow_rows("b", 60))
    monkeypatch.setitem(SECTIONS, "c", never_called)

    # a: rows at 0 and 120 s start (the second overruns the 200 s cap), the third finds the cap spent.
    rows, seconds = run_section("a", ctx)
    assert [r.status for r in rows] == [PASS, PASS, SKIPPED_BUDGET]
    assert seconds == 240 and rows[2].measured == "section a cap 200 s, 240 s spent; not run: row 2"
    # b: 90 s of the total left; rows at 0 and 60 s start, the third finds the total (330 s) spent.
    rows, seconds = run_section("b", ctx)
    assert [r.status for r in rows] == [PASS, PASS, SKIPPED_BUDGET]
    assert rows[2].measured == ("section b cap 70 s, 120 s spent; total budget 330 s spent (360 s); "
                                "not run: row 2")
    # c starts after the total is spent: one row, and its work never starts.
    rows, seconds = run_section("c", ctx)
    assert len(rows) == 1 and seconds == 0
    assert (rows[0].section, rows[0].check, rows[0].status) == ("c", "fp16 (Turing)", SKIPPED_BUDGET)
    assert rows[0].measured == ("section c cap 60 s, 0 s spent; total budget 330 s spent (360 s); "
                                "not run: section c (fp16 (Turing))")
    report = ctx.budget.report()
    assert {name: s["hit"] for name, s in report["sections"].items()} == {"a": True, "b": True, "c": True}
    assert ctx.budget.spent_s == {"a": 240, "b": 120, "c": 0} and report["total_spent_s"] == 360


def test_the_report_writes_every_row_so_far_after_each_part(tmp_path, capsys):
    out = tmp_path / "check.json"
    budget = Budget.shared(480, ["a", "b"], clock=FakeClock())
    report = Report(out, {"dry_run": True, "device": "cpu", "sections": ["a", "b"]}, budget)
    report.add("setup", [Row("setup", "model", PASS)], 3.0)
    document = json.loads(out.read_text())
    assert [r["check"] for r in document["rows"]] == ["model"] and document["complete"] is False
    assert document["section_s"] == {} and document["budget"]["sections"]["a"]["spent_s"] is None
    budget.start("a")
    budget.finish()
    report.add("a", [Row("a", "fit", PASS, "12 tok/s")], 0.0)
    document = json.loads(out.read_text())
    assert [r["check"] for r in document["rows"]] == ["model", "fit"] and document["section_s"] == {"a": 0.0}
    assert "12 tok/s" in capsys.readouterr().out  # the section's own table, before the end
    report.finish()
    assert json.loads(out.read_text())["complete"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"]  # no temporary file left


def setup_allocator(document: dict) -> dict:
    return next(r for r in document["rows"] if r["check"] == "random model, tokenizer, corpus")["figures"][
        "cuda_allocator"]


def rows_by_check(document: dict) -> dict[tuple[str, str], dict]:
    return {(row["section"], row["check"]): row for row in document["rows"]}


def run_watching_the_json(args: list[str], out: Path, logs: Path, timeout_s: float) -> tuple[int, list[dict]]:
    """Runs the check and reads `out` every 50 ms while it runs: its exit status and each distinct state of the
    JSON seen (the sections its rows name, in order of appearance; `complete`; `section_s`)."""
    states: list[dict] = []

    def look() -> None:
        if not out.exists():
            return
        document = json.loads(out.read_text())  # written whole, then renamed: never half a file
        sections = list(dict.fromkeys(row["section"] for row in document["rows"]))
        state = {"sections": sections, "complete": document["complete"], "section_s": document["section_s"]}
        if not states or states[-1] != state:
            states.append(state)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    # Files, not pipes: a pipe nobody reads while the check runs would fill and stall it.
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args, "--out", str(out)],
                                cwd=ROOT, stdout=stdout, stderr=stderr, env=env)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            look()
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        look()
    return proc.wait(), states


@pytest.mark.slow
def test_dry_run_runs_every_section_on_cpu_and_reports_numbers(tmp_path):
    out = tmp_path / "dry.json"
    # A generous budget: a loaded CI machine must not turn rows into budget skips (the budget's own tests use a
    # fake clock).
    status, states = run_watching_the_json(["--dry-run", "--budget-s", "3600"], out, tmp_path, timeout_s=900)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert status == 0, stderr[-3000:]
    assert "codetune GPU check (dry run, CPU" in stdout and "FAIL" not in stdout
    # The rows are on disk as each part ends: setup alone first, section a's rows before section c's exist, and
    # every state in between names the sections in order, with the timings of those finished.
    order = ["setup", "t", "a", "b", "c", "d", "e", "f"]
    assert states[0]["sections"] == ["setup"] and states[0]["section_s"] == {}
    assert any("a" in s["sections"] and "c" not in s["sections"] for s in states)
    for state in states:
        assert state["sections"] == order[:len(state["sections"])]
        assert list(state["section_s"]) == state["sections"][1:]
        assert state["complete"] is (state is states[-1])
    assert [len(s["sections"]) for s in states] == sorted(len(s["sections"]) for s in states)
    assert "gpu_check section a, training:" in stdout.split("codetune GPU check (dry run")[0]

    document = json.loads(out.read_text())
    assert document["complete"] is True and set(document["section_s"]) == set(order[1:])
    assert document["setup_s"] > 0 and document["wall_s"] >= document["setup_s"] + sum(document["section_s"].values())
    budget = document["budget"]
    assert budget["total_s"] == 3600 and sum(s["cap_s"] for s in budget["sections"].values()) == pytest.approx(3600)
    assert not [name for name, s in budget["sections"].items() if s["hit"]]
    rows = rows_by_check(document)
    assert {r["section"] for r in document["rows"]} == set(order)
    assert not [r for r in document["rows"] if r["status"] in ("FAIL", SKIPPED_BUDGET)]

    # The Turing row: codetune's attention on an emulated 7.5 card runs every call on the memory-efficient kernel.
    turing = next(r for r in document["rows"] if r["section"] == "t")
    assert turing["status"] == "pass" and turing["figures"]["math_calls"] == 0
    assert turing["figures"]["sdpa_calls"] > 0 and set(turing["figures"]["kernels"]) == {"efficient"}
    # The manifest's kernel is the CPU's here (the module plans for the device it runs on; on a card it is 7.5's).
    assert turing["figures"]["attention"]["kernel"] == "cpu" and turing["figures"]["micro_batch_size"] == 4
    assert all(math.isfinite(x) for x in turing["figures"]["losses"])
    assert setup_allocator(document)["expandable_segments"] is True

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
        assert rows[("a", f"{label} config on a 6 GiB card")]["status"] == NEEDS_CUDA

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
    assert rows[("d", "isolation, 3 windows of 64, flash_attention_2")]["status"] == NEEDS_CUDA

    generate = rows[("e", "codetune generate (unquantized, cpu)")]["figures"]
    assert generate["exit_status"] == 0 and generate["output"].startswith("def analyze_")
    merge = rows[("e", "codetune merge (float32) = base + adapter")]
    assert merge["status"] == "pass" and merge["figures"]["rel_diff"] <= 1e-4
    assert merge["figures"]["adapter_effect_rel"] > 1e3 * merge["figures"]["rel_diff"]
    assert rows[("f", "pytest -m gpu tests/gpu")]["status"] == NEEDS_CUDA
