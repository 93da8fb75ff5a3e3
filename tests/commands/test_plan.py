"""`codetune plan`: both shipped configs on a 6 GiB card, the JSON a script reads, and one-line errors.

The model is Qwen2.5-Coder-1.5B's shape from the config.json kept in bench/models (no weights, no
download); the card is given with --vram, so no GPU is needed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from codetune.__main__ import main as package_main
from codetune.__main__ import main as cli_main
from codetune.commands.plan import parse_fit_config, parse_size, plan_report
from codetune.data.model_source import EMBEDDED_DIR
from codetune.memory.estimate import plan_memory
from codetune.memory.shapes import ALLOCATOR_MARGIN, DEFAULT_LORA_TARGETS, ModelShape, TrainingShape
from codetune.memory.units import GiB

from helpers import TINY_PRESET

REPO = Path(__file__).resolve().parents[2]
QWEN_DIR = REPO / "bench" / "models" / "qwen2.5-coder-1.5b"
DEFAULT, RUST = REPO / "configs" / "training_config.yaml", REPO / "configs" / "training_config_rust.yaml"
QWEN = ModelShape(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, head_dim=128,
                  qkv_bias=True)
# What fit does on CUDA with the shipped settings: NF4, 16-bit autocast, 8-bit AdamW, packed sdpa; on the card
# assumed without --capability (Turing, 7.5) the memory-efficient kernel runs every micro-batch.
CUDA_DEFAULTS = TrainingShape(quantization="nf4", compute_dtype_bytes=2, optimizer="adamw_8bit",
                              lora_target_modules=DEFAULT_LORA_TARGETS, loss_chunk_size=1024,
                              attn_implementation="sdpa", packed_windows=True, device="cuda",
                              unmasked_kernel="efficient")
SHIPPED = {  # config: (extra flags, the plan fit makes at its own micro-batch, accumulation)
    # The default config leaves checkpointing to the module's default, auto: on at 6 GiB.
    "default": (DEFAULT, [],
                replace(CUDA_DEFAULTS, seq_len=2048, micro_batch_size=8, lora_rank=8, lora_dropout=0.0,
                        gradient_checkpointing=True), 2),
    "rust": (RUST, [], replace(CUDA_DEFAULTS, seq_len=4096, micro_batch_size=4, lora_rank=16, lora_dropout=0.0,
                               gradient_checkpointing=True), 4),
}


def _plan(capsys, *args: str, entry=package_main) -> tuple[int, str, str]:
    status = entry(["plan", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _json_plan(capsys, *args: str) -> dict:
    status, out, err = _plan(capsys, *args, "--json")
    assert status == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_fits_a_6_gib_card_at_its_own_micro_batch(capsys, name):
    config, flags, expected, accumulation = SHIPPED[name]
    report = _json_plan(capsys, "--config", str(config), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                        *flags)
    plan = plan_memory(QWEN, expected)
    assert report["training"] == {**expected.__dict__, "lora_target_modules": list(DEFAULT_LORA_TARGETS),
                                  "modules_to_save": []}
    assert (report["micro_batch_size"], report["gradient_accumulation_steps"]) == (expected.micro_batch_size,
                                                                                   accumulation)
    assert report["predicted_peak_bytes"] == plan.total <= 6 * GiB
    assert report["required_free_bytes"] == plan.required_free_bytes() <= 6 * GiB and report["fits"] is True
    # Its micro-batch is also the largest that fits: twice as many windows would not.
    assert report["largest_fitting"]["micro_batch_size"] == expected.micro_batch_size
    assert not plan_memory(QWEN, replace(expected, micro_batch_size=2 * expected.micro_batch_size)).fits(6 * GiB)


@pytest.mark.parametrize(("dtype", "capability"), [("bfloat16", "8.0"), ("float16", "7.5")])
def test_fp16_on_turing_takes_the_bytes_of_bf16(capsys, dtype, capability):
    report = _json_plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                        "--model.dtype", dtype, "--capability", capability)
    assert report["predicted_peak_bytes"] == plan_memory(QWEN, SHIPPED["rust"][2]).total


@pytest.mark.parametrize("name", SHIPPED)
def test_a_turing_card_gets_float16_and_a_fused_kernel_and_both_configs_fit_6_gib(capsys, name):
    """`codetune plan --capability 7.5 --vram 6GiB`: what an RTX 2060 trains in, and that it fits."""
    config, flags, expected, _ = SHIPPED[name]
    report = _json_plan(capsys, "--config", str(config), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                        "--capability", "7.5", *flags)
    assert (report["capability"], report["capability_source"]) == ("7.5", "--capability")
    assert (report["dtype"], report["precision"], report["float16_residual_scale"]) == ("float16", "16-mixed", 32)
    assert report["attention_kernel"] == "efficient" and not report["attention"]["fp32_scores"]
    assert report["attention"]["repeat_kv"] is True and report["fits"] is True
    assert (report["micro_batch_size"], report["gradient_checkpointing"]) == (expected.micro_batch_size, True)
    ampere = _json_plan(capsys, "--config", str(config), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                        "--capability", "8.6", *flags)
    assert (ampere["dtype"], ampere["precision"], ampere["attention_kernel"]) == ("bfloat16", "bf16-mixed",
                                                                                  "flash+efficient")
    assert ampere["float16_residual_scale"] is None


def test_without_file_boundaries_turing_repeats_key_and_value_and_plans_their_bytes(capsys):
    # Without checkpointing every layer keeps its attention's inputs: the repeated k/v show in the activations.
    flags = ["--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB", "--data.packing",
             "concat", "--model.gradient_checkpointing", "false"]
    turing, hopper = (_json_plan(capsys, *flags, "--capability", c) for c in ("7.5", "9.0"))
    assert (turing["attention_kernel"], hopper["attention_kernel"]) == ("efficient", "flash")
    concat = replace(SHIPPED["rust"][2], packed_windows=False, gradient_checkpointing=False)
    assert turing["predicted_peak_bytes"] == plan_memory(QWEN, replace(concat, unmasked_kernel="efficient")).total
    assert hopper["predicted_peak_bytes"] == plan_memory(QWEN, replace(concat, unmasked_kernel="flash")).total
    assert turing["terms_bytes"]["activations"] > hopper["terms_bytes"]["activations"]


def test_the_text_answer_names_the_card_the_dtype_and_the_kernel(capsys):
    status, out, _ = _plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB")
    assert status == 0
    assert "compute capability 7.5 (assumed: no card here and no --capability" in out
    assert "trains in float16 (16-mixed, residual stream scaled by 1/32)" in out
    assert "attention: sdpa: memory-efficient, key/value repeated to the query heads for every micro-batch" in out


def test_auto_checkpointing_is_on_for_the_default_config_at_6_gib_and_off_on_an_80_gb_card():
    config = parse_fit_config(["--config", str(DEFAULT)])
    model = config.model
    assert model.gradient_checkpointing == "auto"  # CodeLoRAModule's default; the config does not set it
    small = plan_report(QWEN, model, config.data, 6 * GiB)
    assert (small["gradient_checkpointing"], small["micro_batch_size"], small["fits"]) == (True, 8, True)
    assert small["without_checkpointing_bytes"] > 50 * GiB
    large = plan_report(QWEN, model, config.data, 80 * 10**9)
    assert (large["gradient_checkpointing"], large["fits"]) == (False, True)
    assert large["predicted_peak_bytes"] == plan_memory(QWEN, replace(SHIPPED["default"][2],
                                                                      gradient_checkpointing=False)).total


def test_the_text_answer_prints_every_term_and_both_decisions(capsys):
    status, out, _ = _plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                           entry=cli_main)
    assert status == 0
    plan = plan_memory(QWEN, SHIPPED["rust"][2])
    for label, size in [("activations", plan.activations), ("last layer backward*", plan.layer_backward),
                        ("loss chunk*", plan.loss_chunk), ("peak", plan.total)]:
        assert f"  {label:<22} {size / GiB:>8.2f} GiB" in out
    assert (f"fits in 6.00 GiB free: needs {plan.required_free_bytes() / GiB:.2f} GiB with the 10% allocator margin "
            f"(expandable segments; ") in out
    assert "gradient checkpointing: on (--model.gradient_checkpointing true)" in out
    assert "largest micro-batch that fits: 4 x 4 accumulation (checkpointing on" in out


def test_json_holds_bytes_gib_and_the_terms(capsys):
    report = _json_plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram=10GiB")
    plan = plan_memory(QWEN, SHIPPED["rust"][2])
    assert report["terms_bytes"] == plan.terms() and list(report["terms_gib"]) == list(plan.terms())
    assert report["terms_gib"]["activations"] == round(plan.activations / GiB, 3)
    assert (report["free_bytes"], report["free_gib"], report["free_source"]) == (10 * GiB, 10.0, "--vram")
    assert report["allocator_margin"] == ALLOCATOR_MARGIN == 0.1
    assert report["model_config"] == str(QWEN_DIR / "config.json") and report["configs"] == [str(RUST)]
    assert report["model_shape"] == QWEN.__dict__
    # 10 GiB: the effective batch of 16 fits 8 windows at once (with checkpointing, as the config says).
    largest = report["largest_fitting"]
    assert (largest["micro_batch_size"], largest["gradient_accumulation_steps"]) == (8, 2)
    assert largest["required_free_bytes"] == plan_memory(QWEN, replace(SHIPPED["rust"][2],
                                                                       micro_batch_size=8)).required_free_bytes()


def test_batch_size_auto_plans_the_micro_batch_fit_would_pick(capsys):
    flags = ["--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--data.batch_size", "auto",
             "--data.effective_batch_size", "16"]
    for vram, micro, fits in (("6GiB", 4, True), ("10GiB", 8, True), ("4.5GiB", 2, True), ("3GiB", 1, False)):
        report = _json_plan(capsys, *flags, "--vram", vram)
        assert (report["micro_batch_size"], report["gradient_accumulation_steps"]) == (micro, 16 // micro), vram
        assert report["predicted_peak_bytes"] == plan_memory(QWEN, replace(SHIPPED["rust"][2],
                                                                           micro_batch_size=micro)).total
        # Nothing fits 3 GiB: fit would start at 1 and warn; the plan says so.
        assert report["fits"] is fits and (report["largest_fitting"] is None) is not fits


def test_the_tiny_model_is_planned_from_its_config(capsys):
    report = _json_plan(capsys, "--config", str(DEFAULT), "--config", TINY_PRESET, "--vram", "1GiB")
    # The tokenizer trained at fit time has at most --data.tiny_vocab_size (2048) entries; the tiny Llama is untied.
    assert report["model_shape"]["vocab_size"] == 2048 and report["model_shape"]["tie_word_embeddings"] is False
    assert report["training"]["quantization"] == "none" and report["training"]["seq_len"] == 256
    assert report["fits"] is True


def test_the_embedded_model_is_planned_from_its_shipped_config(capsys):
    report = _json_plan(capsys, "--config", str(DEFAULT), "--config", str(REPO / "configs/presets/demo.yaml"),
                        "--vram", "1GiB")
    assert report["model"] == "embedded" and report["model_config"] == str(EMBEDDED_DIR / "config.json")
    assert report["model_shape"]["vocab_size"] == 8192 and report["model_shape"]["tie_word_embeddings"] is True
    assert report["fits"] is True


def test_shipped_config_names_work_from_any_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = _json_plan(capsys, "--config", "default", "--config", "demo", "--vram", "1GiB")
    monkeypatch.chdir(REPO)
    by_path = _json_plan(capsys, "--config", str(DEFAULT), "--config", "configs/presets/demo.yaml", "--vram", "1GiB")
    assert named["configs"] == ["default", "demo"]
    assert named["terms_bytes"] == by_path["terms_bytes"] and named["training"] == by_path["training"]


def test_sizes_take_binary_and_decimal_units():
    assert parse_size("6GiB") == parse_size("6144MiB") == parse_size("6 gib") == 6 * 2**30
    assert (parse_size("8GB"), parse_size("5.5GiB"), parse_size("512MB")) == (8 * 10**9, 5.5 * 2**30, 512 * 10**6)


@pytest.mark.parametrize("args, message", [
    (["--vram", "6G"], "--vram '6G': give the card's free memory with a unit, e.g. --vram 6GiB"),
    (["--vram", "0GiB"], "--vram '0GiB': must be more than 0"),
    (["--vram"], "--vram '': give the card's free memory"),
    (["--model.lora_rnk", "16"], "`codetune plan` has no flag --model.lora_rnk (did you mean --model.lora_rank?). "
                                 "`codetune plan --help` lists them. `codetune plan` takes fit's --config"),
    (["--model.lora_rank", "abc"], "--model.lora_rank: Expected a <class 'int'>. Got value: abc"),
    (["--config", "rsut"], "--config rsut: no such file, and not the name of a shipped config (default, rust, demo)"),
    (["--data.seq_len", "65536"], "--data.seq_len=65536 is longer than the model's context (32768 tokens)"),
    (["--data.batch_size", "auto"], "--data.batch_size auto needs --data.effective_batch_size N"),
    (["--model.lora_target_modules", "[c_attn]"], "--model.lora_target_modules=['c_attn']: the estimate knows"),
    (["--capability", "7"], "--capability '7': give the card's compute capability as MAJOR.MINOR, e.g. 7.5"),
    (["--capability", "7.5", "--model.dtype", "bfloat16"], "Use --model.dtype auto (float16 on this card) or float32"),
])
def test_bad_input_is_one_line_and_status_2(capsys, args, message):
    status, out, err = _plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB",
                             *args)
    assert (status, out) == (2, "")
    assert err.startswith("codetune plan: error: ") and err.count("\n") == 1 and message in err


def test_a_model_without_config_json_names_the_flag(capsys, tmp_path):
    status, _, err = _plan(capsys, "--config", str(RUST), "--model.name_or_path", str(tmp_path), "--vram", "6GiB")
    assert status == 2 and f"--model.name_or_path {str(tmp_path)!r}: the directory has no config.json" in err
    missing = "codetune-tests/no-such-model"
    status, _, err = _plan(capsys, "--config", str(RUST), "--model.name_or_path", missing, "--vram", "6GiB")
    assert status == 2 and f"--model.name_or_path '{missing}': no such directory, and no config.json" in err
    assert f"hf download {missing} config.json" in err and err.count("\n") == 1
    status, _, err = _plan(capsys, "--model.name_or_path", str(QWEN_DIR), "--vram", "6GiB")
    assert status == 2 and "no --config given" in err


def test_without_vram_and_without_a_card_the_flag_is_asked_for(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = _plan(capsys, "--config", str(RUST), "--model.name_or_path", str(QWEN_DIR))
    assert status == 2 and "no CUDA card here to read the free memory from: give it with --vram" in err


def test_make_plan_runs_the_command():
    result = subprocess.run(["make", "-n", "plan", "CONFIG=configs/training_config_rust.yaml",
                             f"MODEL={QWEN_DIR}", "ARGS=--vram 6GiB --json"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert (f"-m codetune plan --config configs/training_config_rust.yaml --model.name_or_path {QWEN_DIR} "
            f"--vram 6GiB --json") in result.stdout
