"""End-to-end: the CLI trains the tiny model on a fixture repo and leaves a usable run directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from codetune.__main__ import main
from helpers import DEFAULT, TINY_PRESET, fit_args

ROOT = Path(__file__).resolve().parents[1]


# The fixture repository packs into 14 training windows: 4 optimizer steps an epoch (3 batches of 4, then 2).
# 11 steps stop the run 3 steps into its third epoch; with validation at epoch ends only, the last one due
# before the stop (after step 8) is 3 steps stale, so only the validation that the stop itself asks for
# measures the final weights.
STEPS, STEPS_PER_EPOCH = 11, 4


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def scalars(run_dir: Path, tag: str) -> list[float]:
    return [e.value for e in tensorboard_events(run_dir).Scalars(tag)]


def scalar_steps(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a scalar tag, checking that no step was logged twice."""
    logged = [(e.step, e.value) for e in tensorboard_events(run_dir).Scalars(tag)]
    assert len({step for step, _ in logged}) == len(logged), (tag, logged)
    return dict(logged)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, str]:
    from helpers import write_fixture_repo

    tmp = tmp_path_factory.mktemp("cli")
    repo = write_fixture_repo(tmp / "repo")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(fit_args(repo, tmp / "runs", "t", "--trainer.max_steps", str(STEPS),
                             "--trainer.val_check_interval", "1.0")) == 0
    return tmp / "runs" / "t", out.getvalue()


def training_stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "MANIFEST.json").read_text())["phase_results"]["phase_4_training"]["training_stats"]


def test_fit_writes_manifest_logs_and_prints_run_dir_last(trained_run):
    run_dir, stdout = trained_run
    assert stdout.strip().splitlines()[-1] == str(run_dir)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    stats = manifest["phase_results"]["phase_4_training"]["training_stats"]
    # The final losses are the last ones logged: the last step's training loss, the last validation's loss.
    assert stats["final_train_loss"] == pytest.approx(scalars(run_dir, "train/loss")[-1], rel=1e-6)
    assert stats["final_val_loss"] == pytest.approx(scalars(run_dir, "val/loss")[-1], rel=1e-6)
    assert stats["final_perplexity"] == pytest.approx(math.exp(stats["final_val_loss"]), rel=1e-9)
    assert stats["final_perplexity"] == pytest.approx(scalars(run_dir, "val/perplexity")[-1], rel=1e-6)
    assert manifest["phase_results"]["phase_5_evaluation"]["final"]["perplexity"] == pytest.approx(
        stats["final_perplexity"], rel=1e-9)
    assert stats["optimizer_steps"] == STEPS and stats["epochs"] == round(STEPS / STEPS_PER_EPOCH, 3)
    windows = manifest["phase_results"]["phase_2_tokenize"]["train_windows"]
    assert -(-windows // 4) == STEPS_PER_EPOCH
    epochs, steps_into_the_last = divmod(STEPS, STEPS_PER_EPOCH)
    assert steps_into_the_last, "fixture sized so the run stops mid-epoch"
    # Each full epoch trains every window once; a step inside an epoch takes a full optimizer batch of 4.
    assert stats["tokens_trained"] == (epochs * windows + steps_into_the_last * 4) * 64
    assert manifest["training_time_minutes"] > 0
    assert manifest["status"] == "completed"
    assert manifest["config"]["data"]["seq_len"] == 64
    assert manifest["phase_results"]["phase_1_scan"]["files_kept"] == 13
    # config.yaml is the resolved config, the flags of this run in it, and the manifest records that same config.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config == manifest["config"] and config["trainer"]["max_steps"] == STEPS
    assert config["data"]["batch_size"] == 2 and config["model"]["name_or_path"] == "tiny"
    # Nothing that names this run: alone, the config re-runs as a new run (tests/multiprocess/test_never_lost.py).
    assert config["run_name"] is None and config["trainer"]["default_root_dir"] is None and manifest["run_name"] == "t"
    # One samples file per eval (the base, then each epoch end, the stopped third one included), each with the
    # same prompts: the tests' preset's 12 repo prompts, the default 16 FIM prompts and the config's language prompts.
    samples = {p.name: [json.loads(line) for line in p.read_text().splitlines()]
               for p in (run_dir / "samples").glob("*.jsonl")}
    assert sorted(samples) == ["base.jsonl", "epoch_0.jsonl", "epoch_1.jsonl", "epoch_2.jsonl"]
    prompts = {name: [(r["kind"], r.get("path"), r.get("line"), r.get("prompt")) for r in rows]
               for name, rows in samples.items()}
    assert all(p == prompts["base.jsonl"] for p in prompts.values())
    kinds = [kind for kind, *_ in prompts["base.jsonl"]]
    language = len(config["generation"]["prompts"])
    assert (kinds.count("repo"), kinds.count("fim"), kinds.count("language")) == (12, 16, language)
    # Each phase shows one line on the console as it ends, in pipeline order.
    shown = [line.split()[2] for line in stdout.splitlines() if line.startswith("codetune ✓ ")]
    assert shown == list(manifest["phase_results"]), shown
    assert list(manifest["phase_results"]) == ["phase_1_scan", "phase_2_tokenize", "phase_3_model",
                                               "phase_4_training", "phase_5_evaluation", "phase_6_export"]
    assert all(p["status"] == "completed" and p["wall_s"] >= 0 and p["started_at"]
               for p in manifest["phase_results"].values())


TRAIN_SCALARS = ("train/loss", "train/lr", "train/tokens_per_s", "train/micro_batch_size", "train/grad_accum",
                 "train/grad_norm", "train/skipped_steps")
EVAL_SCALARS = ("eval/perplexity", "eval/next_line_exact_match", "eval/chrf", "eval/fim_exact_match",
                "eval/fim_chrf", "eval/fim_syntax_valid")


def test_tensorboard_has_one_value_per_step_of_each_grouped_scalar(trained_run):
    run_dir, _ = trained_run
    events = tensorboard_events(run_dir)
    tags = set(events.Tags()["scalars"])
    assert "hp_metric" not in tags and not any(t.endswith("_base") for t in tags)
    assert all(t.startswith(("train/", "val/", "eval/")) for t in tags), tags  # no `epoch` staircase
    for tag in TRAIN_SCALARS:
        assert list(scalar_steps(run_dir, tag)) == list(range(STEPS)), tag
    # Batches of 2 x 2 windows; each epoch's last step has the 2 windows left of 14.
    assert set(scalars(run_dir, "train/micro_batch_size")) == {2.0}
    assert scalars(run_dir, "train/grad_accum") == [2.0 if (s + 1) % STEPS_PER_EPOCH else 1.0 for s in range(STEPS)]
    # A validation at each epoch end (after steps 4 and 8) and after the step where max_steps stops the run;
    # Lightning logs each at the index of the training step it follows.
    val_loss, val_perplexity = scalar_steps(run_dir, "val/loss"), scalar_steps(run_dir, "val/perplexity")
    assert list(val_loss) == list(val_perplexity) == [3, 7, STEPS - 1]
    assert all(val_perplexity[s] == pytest.approx(math.exp(val_loss[s]), rel=1e-5) for s in val_loss)
    # The generation eval: the base at step 0 of the same curves, then at every epoch end, the stopped one too.
    for tag in EVAL_SCALARS:
        assert list(scalar_steps(run_dir, tag)) == [0, 4, 8, STEPS], tag
    base = json.loads((run_dir / "MANIFEST.json").read_text())["phase_results"]["phase_5_evaluation"]["base"]
    perplexity = scalars(run_dir, "eval/perplexity")
    assert perplexity[0] == pytest.approx(base["perplexity"], rel=1e-6)
    assert perplexity[1:] == pytest.approx(list(val_perplexity.values()), rel=1e-6)
    # Every sample is a text tag with one entry per eval.
    texts = events.Tags()["tensors"]
    assert len(texts) == 12 + 16 + 4 and all(t.startswith("samples/") for t in texts), texts
    assert all([e.step for e in events.Tensors(t)] == [0, 4, 8, STEPS] for t in texts)


def held_out_loss(run_dir: Path) -> float:
    """Mean token NLL of the exported adapter on the run's held-out windows, computed apart from the module and
    its labels: peft loads the adapter onto the saved base, and each piece of a file in a window (positions
    restart at 0 at each file and window start) is scored on its own, with full logits, every token after its
    first a target; padding (past `n_real`) is no target."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codetune.data.datamodule import CodeDataModule

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = CodeDataModule(**{**config["data"], "tokenizer": str(run_dir / "base_model")})
    data.setup("fit")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                      run_dir / "adapter").eval()
    windows = data.val_windows
    nll, targets = 0.0, 0
    with torch.no_grad():
        for ids, positions, n_real in zip(torch.as_tensor(windows.input_ids), windows.position_ids, windows.n_real):
            starts = [int(i) for i in np.flatnonzero(positions[:n_real] == 0)] + [int(n_real)]
            for start, end in zip(starts, starts[1:]):
                logits = model(input_ids=ids[None, start:end].long()).logits[0, :-1]
                nll += F.cross_entropy(logits, ids[start + 1:end].long(), reduction="sum").item()
                targets += end - start - 1
    return nll / targets


def test_final_val_loss_is_the_held_out_loss_of_the_final_weights(trained_run):
    run_dir, _ = trained_run
    stats = training_stats(run_dir)
    measured = held_out_loss(run_dir)
    assert stats["final_val_loss"] == pytest.approx(measured, rel=1e-5)
    # The validation before the stop (after step 8) is a different figure: the test tells a stale one apart.
    assert abs(scalar_steps(run_dir, "val/loss")[7] - measured) > 0.05


def test_loss_goes_down(trained_run):
    run_dir, _ = trained_run
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == STEPS
    # 11 steps at the tests' preset settings (LoRA + trained embeddings) take the mean loss from ~6.2 to ~3.9;
    # step-to-step noise is ~0.2, so a drop of 2 nats cannot come from noise.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 2.0, losses
    # On the held-out files: from the base's ~6.3 (before the first step) to ~3.8.
    base = math.log(scalars(run_dir, "eval/perplexity")[0])
    assert scalars(run_dir, "val/loss")[-1] < base - 2.0, (base, scalars(run_dir, "val/loss"))


def is_trained_weight(key: str) -> bool:
    """LoRA factors, or the full copies of the layers the tests' preset trains (modules_to_save)."""
    return "lora_" in key or any(f"{layer}." in key for layer in ("embed_tokens", "lm_head"))


def test_adapter_loads_with_plain_transformers_and_peft(trained_run):
    from helpers import RUST_FILE
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "base_model")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(is_trained_weight(k) for k in adapter)
    # Trained, not as initialised: peft starts every LoRA B at zero and the full copies at the base's weights.
    base_weights = AutoModelForCausalLM.from_pretrained(run_dir / "base_model").state_dict()
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(adapter[k].abs().amax() > 0 for k in lora_b)
    copies = [k for k in adapter if "lora_" not in k]
    assert len(copies) == 2, copies
    for key in copies:
        assert not torch.equal(adapter[key], base_weights[key.removeprefix("base_model.model.")]), key
    ids = tokenizer(RUST_FILE.replace("Counter", "Counter0"), return_tensors="pt")["input_ids"][:, :64]
    base_loss = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")(input_ids=ids, labels=ids).loss
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"), run_dir / "adapter")
    # peft leaves a weight it cannot match to a saved key at its init, with a warning: every one was loaded.
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(adapter) and all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    tuned_loss = model(input_ids=ids, labels=ids).loss
    # The exported adapter carries the training: on a training file it predicts far better than the base.
    assert torch.isfinite(tuned_loss) and tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)


def test_checkpoint_holds_only_lora_weights_and_round_trips(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state = ckpt["state_dict"]
    assert state and all(is_trained_weight(k) for k in state)
    assert any("lora_" in k for k in state)
    # Resume from the checkpoint with nothing left to train: the exported adapter equals the checkpoint.
    config = str(run_dir / "config.yaml")
    args = ["fit", "--config", config, "--runs_dir", str(tmp_path), "--run_name", "resumed",
            "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    assert main(args) == 0
    adapter = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    by_suffix = {k.removeprefix("model.").replace(".modules_to_save", "").replace(".default", ""): v
                 for k, v in state.items()}
    assert set(by_suffix) == set(adapter)
    for key, value in adapter.items():
        assert torch.equal(value, by_suffix[key]), key


def test_bad_repo_is_one_clear_error(tmp_path, capsys):
    assert main(fit_args(tmp_path / "missing", tmp_path / "runs", "bad")) == 2
    err = capsys.readouterr().err
    assert "--data.repo" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_repo_with_nothing_to_train_on(tmp_path, capsys):
    repo = tmp_path / "empty_repo"
    repo.mkdir()
    (repo / "data.bin").write_bytes(b"\x00" * 100)
    assert main(fit_args(repo, tmp_path / "runs", "bad")) == 2
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "--data.extensions" in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_uncached_hub_model_offline_is_one_clear_error(tmp_path, fixture_repo, capsys):
    code = main(fit_args(fixture_repo, tmp_path / "runs", "hub", "--model.name_or_path", "codetune-tests/not-a-model"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--model.name_or_path 'codetune-tests/not-a-model'" in err and "'embedded'" in err and "Traceback" not in err
    # The error surfaced once the run had started: its directory is removed, not left half-made.
    assert not (tmp_path / "runs" / "hub").exists()


def test_window_longer_than_context(tmp_path, fixture_repo, capsys):
    # The tiny model's context is max(seq_len, 4096); a hub-style local model with a short one must refuse.
    from transformers import LlamaConfig, LlamaForCausalLM

    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    tokenizer = train_tokenizer(["fn main() {}\n" * 50], vocab_size=300)
    model = build_tiny_model(tokenizer, max_position_embeddings=32)
    model.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    assert isinstance(model, LlamaForCausalLM) and isinstance(model.config, LlamaConfig)
    code = main(fit_args(fixture_repo, tmp_path / "runs", "bad", "--model.name_or_path", str(tmp_path / "short")))
    assert code == 2
    err = capsys.readouterr().err
    assert "--data.seq_len=64" in err and "context (32 tokens)" in err


class DecoderLayerCalls(Callback):
    """Counts grad-enabled forward calls of the first decoder layer's MLP (training and its recomputation).

    transformers checkpoints a layer's `forward`, not its `__call__`, so the hook sits on a module inside it,
    and it is a *pre*-hook: the recomputation stops as soon as the last saved tensor is rebuilt, before
    the MLP returns."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.causal_lm.get_decoder().layers[0].mlp.register_forward_pre_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += int(torch.is_grad_enabled())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_rust_config_on_a_local_model_dir(tmp_path, fixture_repo, checkpointing):
    """`make train-rust MODEL=<local dir>`: the real loading path (no 'tiny'), the Rust config's LoRA r16,
    and gradient checkpointing that really recomputes each layer in backward."""
    from helpers import PY_FILE, RUST_FILE

    from codetune.cli import build_cli
    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    local = tmp_path / "local-model"
    tokenizer = train_tokenizer([RUST_FILE, PY_FILE], vocab_size=512)
    build_tiny_model(tokenizer).save_pretrained(local)
    tokenizer.save_pretrained(local)
    counter = {"class_path": f"{__name__}.{DecoderLayerCalls.__name__}"}
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "training_config_rust.yaml"),
                     "--data.repo", str(fixture_repo), "--model.name_or_path", str(local),
                     "--model.gradient_checkpointing", str(checkpointing).lower(),
                     "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                     "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
                     "--generation.max_new_tokens", "4", f"--trainer.callbacks+={json.dumps(counter)}",
                     "--data.cache_dir", str(tmp_path / "token-cache"),
                     "--runs_dir", str(tmp_path / "runs"), "--run_name", "rust"])
    model = json.loads((tmp_path / "runs" / "rust" / "MANIFEST.json").read_text())["phase_results"]["phase_3_model"]
    assert model["name_or_path"] == str(local) and model["quantized_4bit"] is False
    assert model["gradient_checkpointing"] is checkpointing
    # LoRA r16 on 7 projections of 2 layers (hidden 128, MLP 384): r x (in + out) per projection.
    per_layer = 16 * (4 * (128 + 128) + 2 * (128 + 384) + (384 + 128))
    assert model["trainable_parameters"] == 2 * per_layer
    calls = next(c for c in cli.trainer.callbacks if isinstance(c, DecoderLayerCalls)).calls
    # 2 optimizer steps x 2 micro-batches; checkpointing runs each layer's forward again in backward.
    assert calls == 4 * (2 if checkpointing else 1)


def test_batch_size_auto_takes_the_largest_micro_batch_the_plan_fits(tmp_path, fixture_repo, capsys, monkeypatch):
    """On an emulated card with room for micro-batch 3 but not 6 (habit 12: the CPU trains, the plan is made for
    CUDA with the free memory a card would report), `auto` trains at 3 x 2 accumulation, as
    `codetune.memory.search` decides it, and the manifest records the plan of that choice."""
    from dataclasses import replace

    from codetune.memory.estimate import plan_memory
    from codetune.memory.search import largest_fitting
    from codetune.memory.shapes import DEFAULT_LORA_TARGETS, ModelShape, training_shape_for
    from codetune.memory.units import GiB
    from codetune.model.module import CodeLoRAModule

    args = ["fit", "--config", DEFAULT, "--config", TINY_PRESET, "--data.repo", str(fixture_repo),
            "--runs_dir", str(tmp_path / "runs"), "--run_name", "auto", "--data.cache_dir", str(tmp_path / "cache"),
            "--data.seq_len", "64", "--data.batch_size", "auto", "--generation.max_new_tokens", "2",
            "--generation.repo_prompts", "0", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2"]
    assert main(args) == 2
    assert "--data.batch_size auto needs --data.effective_batch_size" in capsys.readouterr().err
    card = {}
    plan_memory_for = CodeLoRAModule._plan_memory

    def on_a_card(module, config, quantize, dtype, device):
        # The tests' preset settings as fit resolves them on the CPU: fp32, unquantized, AdamW, checkpointing off.
        shape = ModelShape.from_config(config)
        training = training_shape_for(
            seq_len=64, micro_batch_size=1, quantized_4bit=False, compute_dtype_bytes=4, lora_rank=8,
            lora_target_modules=DEFAULT_LORA_TARGETS, lora_dropout=0.0, modules_to_save=("embed_tokens", "lm_head"),
            optimizer="adamw", gradient_checkpointing=False, loss_chunk_size=1024, attn_implementation="sdpa",
            packing="isolated", device="cuda")
        need = {m: plan_memory(shape, replace(training, micro_batch_size=m)).required_free_bytes(after_load=True)
                for m in (3, 6)}
        free = (need[3] + need[6]) // 2
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * GiB))
        card.update(free=free, choice=largest_fitting(6, free, shape, training, True, after_load=True))
        return plan_memory_for(module, config, quantize, dtype, torch.device("cuda"))

    monkeypatch.setattr(CodeLoRAModule, "_plan_memory", on_a_card)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # as a user who set no allocator variable
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert main([*args, "--data.effective_batch_size", "6"]) == 0
    choice = card["choice"]
    assert (choice.micro_batch_size, choice.gradient_accumulation_steps) == (3, 2)
    run_dir = tmp_path / "runs" / "auto"
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["config"]["data"]["batch_size"] == "auto"
    plan = manifest["phase_results"]["phase_3_model"]["vram_plan"]
    assert (plan["memory"], plan["micro_batch_size"], plan["gradient_checkpointing"]) == ("VRAM", 3, False)
    # The figures of that plan (at 3 decimals of a GiB micro-batches 1, 2, 3 and 6 all differ here).
    assert plan["predicted_peak_gib"] == round(choice.plan.total / GiB, 3)
    assert plan["required_free_gib"] == round(choice.plan.required_free_bytes(after_load=True) / GiB, 3)
    assert plan["free_gib"] == round(card["free"] / GiB, 3)
    assert plan["terms_gib"] == {k: round(v / GiB, 3) for k, v in choice.plan.terms().items()}
    allocator = manifest["phase_results"]["phase_3_model"]["cuda_allocator"]
    assert (allocator["expandable_segments"], allocator["chosen_by"]) == (True, "codetune")
    # Trained at that choice, with the effective batch kept.
    assert scalars(run_dir, "train/micro_batch_size") == [3.0, 3.0]
    assert scalars(run_dir, "train/grad_accum") == [2.0, 2.0]
    assert training_stats(run_dir)["tokens_trained"] == 2 * 6 * 64


def test_batch_size_auto_without_a_card_is_the_whole_batch(monkeypatch):
    """On the CPU there is no card to fit: the optimizer batch is one micro-batch, and the plan is that one's."""
    from types import SimpleNamespace

    from codetune.memory.estimate import plan_memory
    from codetune.memory.shapes import DEFAULT_LORA_TARGETS, ModelShape, training_shape_for
    from codetune.memory.units import GiB
    from codetune.model.module import CodeLoRAModule
    from codetune.model.tiny import tiny_config

    module = CodeLoRAModule(seq_len=64, micro_batch_size="auto", gradient_checkpointing="auto")
    module.optimizer_name = "adamw"
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(optimizer_batch_size=6, packing="isolated"))
    config = tiny_config(512, max_position_embeddings=4096)
    record, checkpointing = module._plan_memory(config, False, torch.float32, torch.device("cpu"))
    expected = plan_memory(ModelShape.from_config(config), training_shape_for(
        seq_len=64, micro_batch_size=6, quantized_4bit=False, compute_dtype_bytes=4, lora_rank=8,
        lora_target_modules=DEFAULT_LORA_TARGETS, lora_dropout=0.0, modules_to_save=(), optimizer="adamw",
        gradient_checkpointing=False, loss_chunk_size=1024, attn_implementation="sdpa", packing="isolated",
        device="cpu"))
    assert module.micro_batch_size == 6 and checkpointing is False
    assert (record["memory"], record["micro_batch_size"]) == ("RAM", 6)
    assert record["predicted_peak_gib"] == round(expected.total / GiB, 3)


def test_make_clean_keeps_the_runs_and_clean_runs_removes_them():
    import os
    import subprocess

    # Outside any make that runs the tests (`make test` in CI): a nested make prints its directory changes.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def make(*args: str) -> str:
        return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True, env=env).stdout

    assert "runs" not in make("-n", "clean").split()
    assert make("-n", "clean-runs").split() == ["rm", "-rf", "runs"]
    listed = make("help")
    assert "make clean-runs" in listed


def test_progress_bar_names_the_runs_limits_and_stops_once():
    from types import SimpleNamespace
    from unittest import mock

    from codetune.callbacks.progress_bar import RunProgressBar

    bar = RunProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=3)  # --trainer.max_steps alone
    assert bar._get_train_description(0).strip() == "Epoch 0 (max 3 steps)"
    bar._trainer = SimpleNamespace(max_epochs=10, max_steps=-1)
    assert bar._get_train_description(2).strip() == "Epoch 2/9"
    bar.progress = mock.Mock()
    bar.on_train_end(None, None)
    bar.teardown(None, None, "fit")
    # Stopped when training ends (before the end-of-run lines print), and not again: each stop off a terminal
    # prints a line.
    assert bar.progress.stop.call_count == 1


def test_lightnings_chatter_is_dropped_and_the_rest_kept():
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from codetune.cli import quiet_lightning

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    checkpoints = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    checkpoints.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_lightning():
                rank_zero_info("GPU available: False, used: False")
                rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
                rank_zero_info("`Trainer.fit` stopped: `max_steps=3` reached.")
                rank_zero_info("codetune data: 28 train / 2 val files")
                checkpoints.info("`weights_only` was not set, defaulting to `False`.")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
                warnings.warn("set --data.seq_len lower", UserWarning)
            rank_zero_info("GPU available: False, used: False")  # outside, Lightning speaks as before
    finally:
        logger.removeHandler(handler)
        checkpoints.removeHandler(handler)
    assert seen == ["codetune data: 28 train / 2 val files", "GPU available: False, used: False"]
    assert [str(w.message) for w in caught] == ["set --data.seq_len lower"]


def test_a_tiny_fit_prints_one_line_per_phase_and_no_lightning_chatter(tmp_path, fixture_repo):
    import os
    import subprocess

    from helpers import fit_command, subprocess_env

    command = fit_command(fixture_repo, tmp_path / "runs", "quiet", "--trainer.max_steps", "2",
                          "--trainer.enable_progress_bar", "true")
    summary = command.index("--trainer.enable_model_summary")
    del command[summary:summary + 2]  # the default now
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True)
    output = result.stdout + result.stderr
    for chatter in ("GPU available", "TPU available", "Tip:", "Seed set to", "Loading `train_dataloader`",
                    "`Trainer.fit` stopped", "LeafSpec", "FLOPs", "Epoch 0/-2"):
        assert chatter not in output, chatter
    assert "Epoch 0/5 (max 2 steps)" in result.stdout  # the tests' preset: 6 epochs
    lines = result.stdout.rstrip().splitlines()
    # The bar is drawn before the end-of-run lines, not again after them.
    assert lines[-1] == str(tmp_path / "runs" / "quiet") and lines[-2].startswith("codetune ✓ phase_6_export")


def test_resuming_a_finished_run_keeps_its_final_losses(tmp_path):
    """`make resume` of a run bounded by epochs that finished: Lightning runs the loop to its end again without a
    step, and the manifest keeps the final losses of the weights it ends with instead of none. (This repository's
    data package as the source: 18 steps an epoch, a shape where the loop does run again.)"""
    runs, repo = tmp_path / "runs", tmp_path / "source"
    shutil.copytree(ROOT / "codetune" / "data", repo, ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["fit", "--config", DEFAULT, "--config", TINY_PRESET, "--data.repo", str(repo), "--runs_dir", str(runs),
                 "--data.cache_dir", str(tmp_path / "token-cache"), "--run_name", "done", "--trainer.max_epochs", "2",
                 "--generation.max_new_tokens", "8"]) == 0
    before = training_stats(runs / "done")
    assert main(["fit", "--config", str(runs / "done" / "config.yaml"), "--ckpt_path", "last"]) == 0
    after = training_stats(runs / "done")
    assert after["final_train_loss"] == pytest.approx(before["final_train_loss"], rel=1e-6)
    assert after["final_val_loss"] == pytest.approx(before["final_val_loss"], rel=1e-4)
    assert after["optimizer_steps"] == before["optimizer_steps"]
