"""`codetune export RUN --to gguf|ollama|vllm`: what it writes, read back; and what it refuses.

Two tiny Llama runs are trained on CPU: one LoRA only (the seven projections and lm_head), one with the tests' preset's
`modules_to_save` (embed_tokens and lm_head trained in full). Other bases (Qwen2, tied or not, GPT-NeoX) are
built from a config and wrapped with peft's real `get_peft_model`/`save_pretrained`, in a run directory laid
out as `codetune fit` writes one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from codetune.__main__ import main
from codetune.export.gguf import rotary_rows_to_ggml

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from helpers import train_fixture_run

    return train_fixture_run(tmp_path_factory.mktemp("export"), "t", "--trainer.max_steps", "6",
                             "--model.modules_to_save", "[]",
                             "--model.lora_target_modules", f"[{','.join(LLAMA_TARGETS)},lm_head]")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The tests' preset: LoRA on the projections, embed_tokens and lm_head trained in full."""
    from helpers import train_fixture_run

    tmp = tmp_path_factory.mktemp("export-demo")
    run = train_fixture_run(tmp, "d", "--trainer.max_steps", "6")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["merge", str(run), "--out", str(tmp / "merged"), "--dtype", "float32"]) == 0
    return run


def peft_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    fields["adapter.lora.alpha:type"] = reader.fields["adapter.lora.alpha"].types[0]
    return fields, {t.name: t for t in reader.tensors}


def values(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor's values in numpy order (outermost dimension first), dequantized."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return data.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def interleave_expected(b: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order written out row by row: per head, row 2i <- HF row i, row 2i+1 <- row i+d/2."""
    d = b.shape[0] // heads
    rows = []
    for h in range(heads):
        for i in range(d // 2):
            rows += [b[h * d + i], b[h * d + i + d // 2]]
    return torch.stack(rows)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def expected_pairs(run: Path, permute_heads: dict[str, int] | None) -> dict[str, np.ndarray]:
    """llama.cpp's name -> expected numpy array, from the peft adapter as saved."""
    expected = {}
    for key, tensor in peft_tensors(run).items():
        if key.endswith(".base_layer.weight"):  # peft's copy of the frozen lm_head, not part of the adapter
            continue
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        if module == "lm_head":
            name = "output.weight"
        else:
            layer = module.split(".")[2]
            name = f"blk.{layer}.{GGUF_NAMES[module.split('.', 3)[3]]}.weight"
        kind = module.rsplit(".", 1)[-1]
        if part == "B.weight" and permute_heads and kind in permute_heads:
            tensor = interleave_expected(tensor, permute_heads[kind])
        expected[f"{name}.lora_{part[0].lower()}"] = tensor.float().numpy()
    return expected


def test_gguf_adapter_reads_back_with_llama_cpp_names_shapes_values_and_metadata(run_dir, tmp_path):
    out = tmp_path / "gguf"
    status, stdout, _ = run_main("export", str(run_dir), "--to", "gguf", "--outtype", "f32", "--out", str(out))
    assert status == 0 and stdout.strip().splitlines()[-1] == str(out)
    fields, tensors = read_gguf(out / "adapter.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["adapter.lora.alpha:type"] == gguf.GGUFValueType.FLOAT32

    base = json.loads((run_dir / "base_model" / "config.json").read_text())
    expected = expected_pairs(run_dir, {"q_proj": base["num_attention_heads"],
                                        "k_proj": base["num_key_value_heads"]})
    # 2 layers x 7 projections + lm_head, two factors each
    assert len(expected) == 2 * (2 * 7 + 1) and set(tensors) == set(expected)
    rank, hidden = 8, base["hidden_size"]
    for name, want in expected.items():
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        # ggml's ne order: lora_a [in, rank], lora_b [rank, out], as llama.cpp checks against the base tensor
        if name.endswith("lora_a"):
            assert int(tensor.shape[1]) == rank and int(tensor.shape[0]) == want.shape[1]
        else:
            assert int(tensor.shape[0]) == rank and int(tensor.shape[1]) == want.shape[0]
        np.testing.assert_array_equal(values(tensor), want, err_msg=name)
    assert int(tensors["blk.0.attn_q.weight.lora_a"].shape[0]) == hidden
    assert int(tensors["output.weight.lora_b"].shape[1]) == base["vocab_size"]
    # the q/k B rows really moved (a no-op permutation would pass the equality above only if this failed)
    raw_b = peft_tensors(run_dir)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    assert not np.array_equal(values(tensors["blk.0.attn_q.weight.lora_b"]), raw_b)


def test_q8_0_where_rows_allow_and_f16_elsewhere(run_dir, tmp_path):
    outs = {kind: tmp_path / kind for kind in ("f16", "q8_0", "f32")}
    stderrs = {}
    for kind, out in outs.items():
        status, _, stderrs[kind] = run_main("export", str(run_dir), "--to", "gguf", "--outtype", kind, "--out",
                                            str(out))
        assert status == 0, stderrs[kind]
    _, f32 = read_gguf(outs["f32"] / "adapter.gguf")
    _, q8 = read_gguf(outs["q8_0"] / "adapter.gguf")
    _, f16 = read_gguf(outs["f16"] / "adapter.gguf")
    for name, tensor in q8.items():
        want = values(f32[name])
        if name.endswith("lora_a"):  # rows of hidden_size (128) values: Q8_0 blocks of 32
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            # Q8_0: per block d = max|x| / 127, q = round(x / d), stored d rounded to float16, so the error is at
            # most d/2 plus 127 * d * 2^-11 (ggml-quants.c, and gguf's bit-exact copy of it)
            d = np.abs(want).reshape(-1, 32).max(axis=1).repeat(32).reshape(want.shape) / 127
            assert np.all(np.abs(values(tensor) - want) <= d * (0.5 + 127 * 2**-11) + 1e-9), name
        else:  # rows of rank (8) values cannot be Q8_0
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(values(tensor), want.astype(np.float16).astype(np.float32))
        assert f16[name].tensor_type == gguf.GGMLQuantizationType.F16
    assert "q8_0: 15 tensors; f16: 15 tensors (LoRA B rows are rank 8 values long" in stderrs["q8_0"]


def test_ollama_writes_the_gguf_adapter_and_a_modelfile(run_dir, tmp_path):
    gguf_out, out = tmp_path / "gguf", tmp_path / "ollama"
    assert run_main("export", str(run_dir), "--to", "gguf", "--out", str(gguf_out))[0] == 0
    status, stdout, stderr = run_main("export", str(run_dir), "--to", "ollama", "--out", str(out))
    assert status == 0, stderr
    assert sha256(out / "adapter.gguf") == sha256(gguf_out / "adapter.gguf")
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert f"FROM {(run_dir / 'base_model').resolve()}" in lines and "ADAPTER ./adapter.gguf" in lines
    assert ('TEMPLATE """{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>'
            '{{- else }}{{ .Prompt }}{{- end }}"""') in lines
    stops = [line.removeprefix("PARAMETER stop ") for line in lines if line.startswith("PARAMETER stop")]
    assert [json.loads(s) for s in stops] == ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                                              "<|file_sep|>"]
    assert f"ollama create codetune-t -f {(out / 'Modelfile').resolve()}" in stderr
    assert "ollama run codetune-t" in stderr


def test_vllm_copies_the_adapter_and_prints_the_serve_line(run_dir, tmp_path):
    out = tmp_path / "vllm"
    status, _, stderr = run_main("export", str(run_dir), "--to", "vllm", "--out", str(out))
    assert status == 0, stderr
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256(out / name) == sha256(run_dir / "adapter" / name)
    assert (f"vllm serve {(run_dir / 'base_model').resolve()} --enable-lora --lora-modules "
            f"codetune-t={out.resolve()} --max-lora-rank 8") in stderr


def test_every_export_is_recorded_in_the_manifest_and_replaces_its_own_entry(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    for target in ("gguf", "vllm", "gguf"):
        assert run_main("export", str(run), "--to", target)[0] == 0
    phase = json.loads((run / "MANIFEST.json").read_text())["phase_results"]["phase_7_export"]
    assert phase["status"] == "completed"
    assert [e["format"] for e in phase["exports"]] == ["vllm", "gguf"]
    for entry in phase["exports"]:
        assert entry["out"] == f"export/{entry['format']}"  # relative: the run moves with its exports
        out = run / entry["out"]
        files = {f["file"]: f for f in entry["files"]}
        on_disk = sorted(p.name for p in out.iterdir() if p.name != "codetune_export.json")
        assert sorted(files) == on_disk
        for name, record in files.items():
            path = out / name
            assert record == {"file": name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    assert phase["exports"][1]["tensor_types"] == {"f32": 30} and phase["exports"][0]["max_lora_rank"] == 8


def test_a_directory_that_is_not_an_export_is_not_replaced(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, _, stderr = run_main("export", str(run_dir), "--to", "gguf", "--out", str(out))
    assert status == 2 and "is a non-empty directory that is not an earlier `codetune export` output" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(("first", "then"), [("gguf", "ollama"), ("ollama", "vllm"), ("vllm", "gguf")])
def test_re_export_replaces_only_what_exports_wrote_and_refuses_to_delete_a_users_file(run_dir, tmp_path, first,
                                                                                         then):
    out = tmp_path / "lora"
    assert run_main("export", str(run_dir), "--to", first, "--out", str(out))[0] == 0
    (out / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, _, stderr = run_main("export", str(run_dir), "--to", then, "--out", str(out))
    assert status == 2 and "Traceback" not in stderr
    assert (f"--out {str(out)!r} holds 1 file or folder that no earlier `codetune export` wrote there: notes.txt; "
            f"replacing the directory would delete it. Move it out of {out}, or give another --out.") in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing deleted, nothing written"
    (out / "notes.txt").unlink()
    # Another target's files replace the first one's: every file there was an export's.
    assert run_main("export", str(run_dir), "--to", then, "--out", str(out))[0] == 0
    assert json.loads((out / "codetune_export.json").read_text())["output_files"] == sorted(
        p.name for p in out.iterdir())


@pytest.mark.parametrize("target", ["gguf", "ollama", "vllm"])
def test_non_finite_weights_are_refused_and_nothing_is_written(run_dir, tmp_path, target):
    run = copy_run(run_dir, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, weights)
    manifest = (run / "MANIFEST.json").read_text()
    status, _, stderr = run_main("export", str(run), "--to", target)
    assert status == 2 and "hold NaN or inf" in stderr and "Traceback" not in stderr
    assert not (run / "export").exists() and (run / "MANIFEST.json").read_text() == manifest


def test_float16_overflow_is_refused_naming_outtype(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[next(k for k in tensors if "lora_A" in k)][0, 0] = 1e6
    save_file(tensors, weights)
    status, _, stderr = run_main("export", str(run), "--to", "gguf", "--outtype", "f16")
    assert status == 2 and "--outtype f16:" in stderr and "Use --outtype f32" in stderr
    assert not (run / "export").exists()
    assert run_main("export", str(run), "--to", "gguf")[0] == 0


# -- refusals ------------------------------------------------------------------------------------------


def synthetic_run(root: Path, model_config, targets: list[str], modules_to_save: list[str] | None = None) -> Path:
    """A run directory holding a real peft adapter (random B, so values are checkable) on a base built from
    `model_config`, saved as a local base directory the run's config.yaml names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir, run = root / "base", root / "run"
    model = AutoModelForCausalLM.from_config(model_config)
    model.save_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                  modules_to_save=modules_to_save))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    peft_model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {
        "name_or_path": str(base_dir), "quantization": "none", "dtype": "float32", "trust_remote_code": False,
        "attn_implementation": "sdpa"}}))
    return run


def qwen2_config(tied: bool):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def test_qwen2_keeps_hugging_faces_row_order(tmp_path):
    run = synthetic_run(tmp_path, qwen2_config(tied=False), ["q_proj", "k_proj", "down_proj", "lm_head"])
    status, _, stderr = run_main("export", str(run), "--to", "gguf", "--outtype", "f32")
    assert status == 0, stderr
    fields, tensors = read_gguf(run / "export" / "gguf" / "adapter.gguf")
    assert fields["general.architecture"] == "qwen2"
    expected = expected_pairs(run, permute_heads=None)
    assert set(tensors) == set(expected) and len(expected) == 2 * (3 * 2 + 1)
    for name, want in expected.items():
        np.testing.assert_array_equal(values(tensors[name]), want, err_msg=name)


def test_refuses_a_lora_on_a_tied_lm_head(tmp_path):
    run = synthetic_run(tmp_path, qwen2_config(tied=True), ["q_proj", "lm_head"])
    status, _, stderr = run_main("export", str(run), "--to", "gguf")
    assert status == 2, stderr
    assert ("--to gguf: the adapter has a LoRA on lm_head, which this base ties to its token embeddings "
            "(tie_word_embeddings), so its GGUF has no output tensor to add it to: train without lm_head in "
            "--model.lora_target_modules.") in stderr
    assert not (run / "export").exists()


def test_refuses_an_architecture_gguf_export_does_not_know(tmp_path):
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4)
    run = synthetic_run(tmp_path, config, ["query_key_value"])
    status, _, stderr = run_main("export", str(run), "--to", "ollama", "--base", "x:latest")
    assert status == 2
    assert ("--to ollama: the base's architecture GPTNeoXForCausalLM is not one codetune exports to GGUF (it knows "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Starcoder2ForCausalLM): use "
            "--to vllm, or `codetune merge` the run") in stderr
    assert run_main("export", str(run), "--to", "vllm")[0] == 0


def test_layers_trained_in_full_become_exact_pairs_and_the_gguf_applied_as_llama_cpp_does_is_the_merge(demo_run):
    """Apply adapter.gguf to the base as llama.cpp does (per pair alpha/rank * B @ A, rank read from B; the token
    embedding's pair flipped), undo the q/k row order, and compare with `codetune merge --dtype float32`."""
    out = demo_run / "export" / "gguf"
    status, _, stderr = run_main("export", str(demo_run), "--to", "gguf", "--outtype", "f32")
    assert status == 0, stderr
    fields, tensors = read_gguf(out / "adapter.gguf")
    alpha = fields["adapter.lora.alpha"]
    base = load_file(demo_run / "base_model" / "model.safetensors")
    merged = load_file(demo_run.parent.parent / "merged" / "model.safetensors")
    config = json.loads((demo_run / "base_model" / "config.json").read_text())
    hf_names = {v: k for k, v in GGUF_NAMES.items()}
    deltas = {}
    for name in {n.rsplit(".lora_", 1)[0] for n in tensors}:
        a, b = values(tensors[f"{name}.lora_a"]), values(tensors[f"{name}.lora_b"])
        rank = b.shape[1]  # llama.cpp: b->ne[0]
        if name == "token_embd.weight":
            deltas["model.embed_tokens.weight"] = alpha / rank * (a @ b.T)
            continue
        if name == "output.weight":
            hf = "lm_head.weight"
        else:
            _, layer, kind, _ = name.split(".")
            hf = f"model.layers.{layer}.{hf_names[kind]}.weight"
        delta = torch.from_numpy(alpha / rank * (b @ a))
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in hf else config["num_key_value_heads"]
            order = rotary_rows_to_ggml(torch.arange(delta.shape[0]), heads)
            delta = delta[torch.argsort(order)]
        deltas[hf] = np.asarray(delta)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(deltas)
    assert len(deltas) == 2 * 7 + 2
    for name, weight in merged.items():
        rebuilt = base[name] + torch.from_numpy(np.asarray(deltas.get(name, 0.0), dtype=np.float32))
        torch.testing.assert_close(rebuilt, weight, rtol=0, atol=2e-6, msg=name)
    assert "f32: 32 tensors" in stderr


def test_refuses_layers_trained_in_full_on_a_tied_base(tmp_path):
    run = synthetic_run(tmp_path, qwen2_config(tied=True), ["q_proj"], modules_to_save=["embed_tokens"])
    status, _, stderr = run_main("export", str(run), "--to", "gguf")
    assert status == 2
    assert ("--to gguf: the adapter trains ['embed_tokens'] in full (--model.modules_to_save) on a base that ties "
            "lm_head to embed_tokens (tie_word_embeddings), and its GGUF holds one matrix for both: train with "
            "--model.modules_to_save '[]' (LoRA only).") in stderr
    assert not (run / "export").exists()


def test_vllm_refuses_layers_trained_in_full(demo_run):
    status, _, stderr = run_main("export", str(demo_run), "--to", "vllm")
    assert status == 2
    assert ("--to vllm: the adapter trains ['embed_tokens', 'lm_head'] in full (--model.modules_to_save), and vLLM "
            "loads only LoRA pairs (it refuses modules_to_save): train with --model.modules_to_save '[]' (LoRA "
            "only), or serve the merged model instead: `codetune merge RUN --out DIR`, then `vllm serve DIR`.") \
        in stderr
    assert not (demo_run / "export" / "vllm").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"use_dora": True}, "the adapter is DoRA (use_dora), which vLLM does not load: train a plain LoRA"),
    ({"bias": "all"}, "the adapter trains biases (bias='all'), which vLLM does not load: train with bias 'none'"),
    ({"r": 1024}, "the adapter's rank 1024 is above vLLM's largest --max-lora-rank (512): train with "
                  "--model.lora_rank 512 or less."),
])
def test_vllm_refusals(run_dir, tmp_path, change, message):
    run = copy_run(run_dir, tmp_path / "run")
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    status, _, stderr = run_main("export", str(run), "--to", "vllm")
    assert status == 2 and f"--to vllm: {message}" in stderr
    assert not (run / "export").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "vllm", "--outtype", "q8_0"], "--outtype is for --to gguf or ollama"),
    (["--to", "gguf", "--base", "x"], "--base is for --to ollama"),
])
def test_flags_for_another_target_are_refused(run_dir, args, message):
    status, _, stderr = run_main("export", str(run_dir), *args)
    assert status == 2 and message in stderr


def test_an_unfinished_run_is_refused_with_the_resume_command(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run", adapter=False)
    status, _, stderr = run_main("export", str(run), "--to", "gguf")
    # Its manifest says completed: the adapter was removed since, and the resume writes it again.
    assert status == 2 and "has no adapter/: it was removed after the run completed" in stderr
    assert f"codetune fit --config {run / 'config.yaml'} --ckpt_path last" in stderr


def copy_run(run_dir: Path, target: Path, *, adapter: bool = True) -> Path:
    """A copy of the run as training left it (without the exports other tests recorded in its manifest)."""
    target.mkdir()
    for name in ("config.yaml", "base_model", *(["adapter"] if adapter else [])):
        source = run_dir / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / name)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    manifest["phase_results"].pop("phase_7_export", None)
    (target / "MANIFEST.json").write_text(json.dumps(manifest))
    return target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", ["gguf", "vllm"])
def test_export_starts_without_lightning_peft_or_transformers(run_dir, tmp_path, target):
    """What keeps an export to a couple of seconds: of the training stack only torch is imported."""
    from helpers import imported_by

    assert imported_by("export", str(run_dir), "--to", target, "--out", str(tmp_path / target)) == ["torch"]


def test_export_help_imports_no_training_stack():
    from helpers import imported_by

    assert imported_by("export", "--help") == []
