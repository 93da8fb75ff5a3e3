"""`codetune generate` and `codetune merge` on one tiny run trained on CPU (12 steps).

How merged and unmerged models are compared: in float32 the merge changes only the order of the
additions (`x @ (W + BA)` against `x @ W + x @ B @ A`), so logits agree to ~1e-6 and greedy tokens
are identical. In bfloat16 both paths round differently, each within about one bf16 step of the
float32 model (1/64 at this model's logits of 2-4), and this tiny, barely trained model has many
top tokens tied or one or two bf16 steps apart: on 79 prompts x 32 tokens the bf16 merge and bf16
base+adapter produced identical greedy tokens on 73, the other 6 parted at such a near-tie, while
either bf16 path agreed with float32 on fewer (62 and 64). So the bf16 test asserts what rounding
allows: logits within two bf16 steps, and tokens that differ only where the reference's top two are
that close.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from codetune.__main__ import main

PROMPTS = ["fn process", "    pub fn add(&mut self", "def analyze_", "class Energy"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from helpers import train_fixture_run

    return train_fixture_run(tmp_path_factory.mktemp("use"), "t", "--trainer.max_steps", "12")


@pytest.fixture(scope="module")
def merged(run_dir) -> dict[str, Path]:
    """The run merged in float32 and in the default dtype (bfloat16)."""
    outs = {"float32": run_dir.parent / "merged32", "bfloat16": run_dir.parent / "merged16"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["merge", str(run_dir), "--out", str(outs["float32"]), "--dtype", "float32"]) == 0
        assert main(["merge", str(run_dir), "--out", str(outs["bfloat16"])]) == 0
    return outs


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return AutoTokenizer.from_pretrained(run_dir / "base_model")


def base_plus_adapter(run_dir: Path, dtype: torch.dtype) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=dtype)
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


@pytest.fixture(scope="module")
def reference(run_dir) -> PeftModel:
    """The run's base + adapter in float32, as training used them on CPU (dtype auto): what the outputs must equal."""
    return base_plus_adapter(run_dir, torch.float32)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    return torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def sampled(model, ids: torch.Tensor, seed: int, temperature: float, top_p: float, new_tokens: int) -> list[int]:
    """A sampled continuation as a user reproduces one in Python: seed the global RNG, then generate."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0].float()


def test_float32_merge_matches_base_plus_adapter(reference, merged, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(merged["float32"]).eval()
    assert model.dtype == torch.float32 and not isinstance(model, PeftModel)
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        tokens = greedy(reference, ids)
        assert greedy(model, ids) == tokens, prompt
        full = torch.cat([ids, torch.tensor([tokens])], dim=1)
        torch.testing.assert_close(logits(model, full), logits(reference, full), atol=1e-4, rtol=0)


def test_bfloat16_merge_matches_base_plus_adapter_up_to_bf16_ties(run_dir, merged, tokenizer):
    reference = base_plus_adapter(run_dir, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(merged["bfloat16"]).eval()
    assert model.dtype == torch.bfloat16
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        expected, got = greedy(reference, ids), greedy(model, ids)
        full = torch.cat([ids, torch.tensor([expected])], dim=1)
        ref_logits = logits(reference, full)
        # Two bf16 steps at the largest logit: what two differently rounded bf16 computations may differ by.
        tol = 2 * torch.finfo(torch.bfloat16).eps * ref_logits.abs().max().item()
        assert (logits(model, full) - ref_logits).abs().max().item() <= tol, prompt
        if got != expected:
            i = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
            step = ref_logits[ids.shape[1] + i - 1]
            gap = (step.max() - step[got[i]]).item()
            assert gap <= tol, f"{prompt!r}: merged picks token {got[i]} at step {i}, {gap:.4f} below the top"


def test_merge_adds_the_update_and_saves_the_requested_dtype(run_dir, merged):
    base = load_file(run_dir / "base_model" / "model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    scale = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    full = load_file(merged["float32"] / "model.safetensors")
    assert set(full) == set(base)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    update = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * scale
    q = "model.layers.0.self_attn.q_proj.weight"
    assert update.abs().max() > 1e-3, "12 steps moved the LoRA factors"
    torch.testing.assert_close(full[q], base[q] + update, atol=1e-6, rtol=0)
    # modules_to_save layers are replaced by their trained copies; layers without an adapter are untouched.
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        trained = adapter[f"base_model.model.{name}"]
        assert torch.equal(full[name], trained) and not torch.equal(trained, base[name]), name
    assert torch.equal(full["model.norm.weight"], base["model.norm.weight"])
    half = load_file(merged["bfloat16"] / "model.safetensors")
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    # The base loads in bf16 (this one is stored in fp32), then peft adds the fp32 update in place: one more rounding.
    assert torch.equal(half[q], (base[q].bfloat16().float() + update).bfloat16())
    assert json.loads((merged["bfloat16"] / "config.json").read_text())["dtype"] == "bfloat16"
    marker = json.loads((merged["bfloat16"] / "codetune_merge.json").read_text())
    assert marker["source_run"] == str(run_dir.resolve()) and marker["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(merged["bfloat16"]).get_vocab() == \
        AutoTokenizer.from_pretrained(run_dir / "base_model").get_vocab()


def test_merge_replaces_an_earlier_merge_but_refuses_a_foreign_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(run_dir), "--out", str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert main(["merge", str(run_dir), "--out", str(out), "--dtype", "float16"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["merge", str(run_dir), "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not an earlier `codetune merge` output" in err and "Traceback" not in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_merge_refuses_to_delete_files_added_to_an_earlier_merge(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(out), "--dtype", "float32"]) == 0
    written = sorted(p.name for p in out.iterdir())
    (out / "README.md").write_text("my model card")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("1,2\n")
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(out), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert (f"--out {str(out)!r} holds 2 files or folders that no earlier `codetune merge` wrote there: README.md, "
            f"eval/; replacing the directory would delete them. Move them out of {out}, or give another --out.") in err
    assert (out / "README.md").read_text() == "my model card" and (out / "eval" / "scores.csv").is_file()
    assert json.loads((out / "codetune_merge.json").read_text())["output_files"] == written


def test_generate_prints_the_greedy_completion_of_base_plus_adapter(run_dir, reference, tokenizer, capsys):
    prompts = PROMPTS[:2]
    expected = [p + tokenizer.decode(greedy(reference, prompt_ids(tokenizer, p)), skip_special_tokens=True)
                for p in prompts]
    args = ["generate", str(run_dir), "--max_new_tokens", str(NEW_TOKENS), "--device", "cpu"]
    assert main([*args, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    out = capsys.readouterr().out
    assert out == "\n\n".join(expected) + "\n"
    assert len(out) > sum(map(len, prompts)) + 8, "something was generated"


def test_generate_defaults_to_the_runs_max_new_tokens(run_dir, reference, tokenizer, capsys):
    ids = prompt_ids(tokenizer, "fn process")
    assert main(["generate", str(run_dir), "--prompt", "fn process", "--device", "cpu"]) == 0
    # fit_args trains with --generation.max_new_tokens 8.
    expected = "fn process" + tokenizer.decode(greedy(reference, ids, new_tokens=8), skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_sampling_is_seeded_per_prompt_and_continues_the_prompt(run_dir, reference, tokenizer, capsys):
    """Each prompt's completion is what base + adapter samples after that prompt's ids with the global RNG seeded
    by --seed just before: the second of two prompts gets what it gets alone. Seeds 3 and 4 sample different
    completions, and neither is the greedy one."""
    from codetune.run.finished import load_run_config

    temperature, new_tokens = 1.5, 8
    top_p = load_run_config(run_dir).top_p  # not given: the run's generation.top_p
    assert top_p < 1, "a nucleus the run chose is applied"
    completions = {}
    for seed, prompts in ((3, ["def analyze_", "fn process"]), (4, ["fn process"])):
        completions[seed] = [tokenizer.decode(sampled(reference, prompt_ids(tokenizer, p), seed, temperature, top_p,
                                                      new_tokens), skip_special_tokens=True) for p in prompts]
        asked = [arg for p in prompts for arg in ("--prompt", p)]
        assert main(["generate", str(run_dir), *asked, "--do_sample", "--temperature", str(temperature), "--seed",
                     str(seed), "--max_new_tokens", str(new_tokens), "--device", "cpu"]) == 0
        assert capsys.readouterr().out == "\n\n".join(p + c for p, c in zip(prompts, completions[seed])) + "\n"
    greedy_completion = tokenizer.decode(greedy(reference, prompt_ids(tokenizer, "fn process"), new_tokens),
                                         skip_special_tokens=True)
    assert len({completions[3][1], completions[4][0], greedy_completion}) == 3


def copy_run(run_dir: Path, target: Path, *, adapter: bool = True) -> Path:
    target.mkdir()
    for name in ("config.yaml", "base_model", *(["adapter"] if adapter else [])):
        source = run_dir / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / name)
    return target


def test_a_float16_merge_that_overflows_is_refused_and_writes_nothing(run_dir, tmp_path, capsys):
    """An adapter whose update is finite in fp32 but above float16's largest value (65504) in one weight: merged in
    float16 that weight is inf, so the merge names it, says which dtypes to use, and writes nothing."""
    run = copy_run(run_dir, tmp_path / "loud")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    b *= 1e5 / (b @ a * config["lora_alpha"] / config["r"]).abs().max()  # in place: the largest update entry is 1e5
    save_file(tensors, weights)
    out = tmp_path / "out"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "float16"]) == 2
    captured = capsys.readouterr()
    # The last line: transformers may draw a weight-loading progress bar on stderr before it.
    assert captured.err.splitlines()[-1] == (
        "codetune merge: error: the merged weights hold NaN or inf in float16 (e.g. model.layers.0.self_attn.q_proj."
        "weight): nothing was written. Use --dtype bfloat16 or float32 (float16 overflows above 65504).")
    assert "Traceback" not in captured.err and not captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud"], "no output, not even a temporary sibling"


@pytest.mark.parametrize("command", ["merge", "generate"])
def test_bad_runs_are_one_clear_error(run_dir, tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "out")] if command == "merge" else ["--prompt", "fn"]
    (tmp_path / "empty").mkdir()
    cases = {
        "does not exist": tmp_path / "missing",
        "has no config.yaml": tmp_path / "empty",
        "has no adapter/: the run did not finish. Resume it with: codetune fit --config":
            copy_run(run_dir, tmp_path / "unfinished", adapter=False),
    }
    nan_run = copy_run(run_dir, tmp_path / "diverged")
    weights = nan_run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    cases["hold NaN or inf"] = nan_run
    for expected, run in cases.items():
        assert main([command, str(run), *extra]) == 2, expected
        captured = capsys.readouterr()
        assert expected in captured.err and "Traceback" not in captured.err, captured.err
        assert captured.err.count("\n") == 1 and not captured.out
        if run == nan_run:
            assert key in captured.err, "the message names the tensor"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_flags_name_the_flag(run_dir, tmp_path, capsys):
    for args, flag in (
        (["merge", str(run_dir), "--out", str(tmp_path / "out"), "--dtype", "int8"], "--dtype 'int8'"),
        (["generate", str(run_dir), "--prompt", "fn", "--temperature", "0.5"], "--temperature only apply"),
        (["generate", str(run_dir), "--prompt", "fn", "--max_new_tokens", "0"], "--max_new_tokens=0"),
        (["generate", str(run_dir), "--prompt", "fn", "--device", "tpu"], "--device 'tpu'"),
        (["generate", str(run_dir), "--prompt", ""], "--prompt number 1 is empty"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def with_recorded_base(run: Path) -> dict:
    """Record the run's base in its manifest as `codetune fit` does (phase_3_model.base_revision)."""
    from codetune.model.revision import local_fingerprint

    record = local_fingerprint(run / "base_model")
    manifest = {"phase_results": {"phase_3_model": {"name_or_path": "tiny", "base_revision": record}}}
    (run / "MANIFEST.json").write_text(json.dumps(manifest))
    return record


def test_generate_and_merge_refuse_a_local_base_changed_since_training(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    record = with_recorded_base(run)
    generate = ["generate", str(run), "--prompt", "fn", "--max_new_tokens", "4", "--device", "cpu"]
    assert main(generate) == 0, "the base is as recorded"
    assert capsys.readouterr().out.startswith("fn")

    config_path = run / "base_model" / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config_path.write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] * 10}))
    for command in (generate, ["merge", str(run), "--out", str(tmp_path / "out")]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        assert captured.err.startswith(f"codetune {command[0]}: error: the base model changed since this run was "
                                       f"trained (config.json changed): recorded {record['revision']}")
        assert "restore the run's base_model/ as `codetune fit` saved it" in captured.err
        assert captured.err.count("\n") == 1 and not captured.out
    assert not (tmp_path / "out").exists()

    config_path.write_text(original)  # restored byte for byte: accepted again
    assert main(generate) == 0


def test_a_hub_base_loads_at_the_commit_the_run_recorded(run_dir, tmp_path, monkeypatch):
    """The hub cannot be reached here, so the loaders are stand-ins that record what they were asked for."""
    from codetune.run.finished import load_run_config, load_tuned_tokenizer
    from codetune.run.tuned import load_tuned_model

    run = copy_run(run_dir, tmp_path / "run")
    config_path = run / "config.yaml"
    config_path.write_text(config_path.read_text().replace("name_or_path: tiny", "name_or_path: org/coder"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    manifest = {"phase_results": {"phase_3_model": {"base_revision": {"kind": "hub", "revision": commit,
                                                                      "requested": None}}}}
    (run / "MANIFEST.json").write_text(json.dumps(manifest))
    asked = {}

    class Loaded(Exception):
        pass

    def fake_load_causal_lm(source, *args, **kwargs):
        asked["model"] = (source, kwargs)
        raise Loaded

    monkeypatch.setattr("codetune.model.loading.load_causal_lm", fake_load_causal_lm)
    monkeypatch.setattr("codetune.data.tokens.load_tokenizer",
                        lambda source, *a, **kwargs: asked.setdefault("tokenizer", (source, kwargs)))
    config = load_run_config(run)
    with pytest.raises(Loaded):
        load_tuned_model(config, torch.device("cpu"), torch.float32, quantize=False)
    load_tuned_tokenizer(config)
    assert asked["model"] == ("org/coder", {"revision": commit})
    assert asked["tokenizer"][0] == "org/coder" and asked["tokenizer"][1]["revision"] == commit


# -- fill in the middle ------------------------------------------------------------------------------------

FIM_NAMES = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>")


def sentinel_ids(tokenizer) -> list[int]:
    """The prefix, suffix, middle and file separator ids, looked up by name (not through codetune)."""
    ids = tokenizer.convert_tokens_to_ids(list(FIM_NAMES))
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == 4, "the tiny tokenizer has Qwen's sentinels"
    return ids


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prefix_suffix_prints_the_greedy_middle_of_base_plus_adapter(run_dir, reference, tokenizer, capsys):
    from codetune.data.fim import find_fim_tokens
    from codetune.eval.infill import infill_prompt_ids

    prefix_id, suffix_id, middle_id, _ = sentinel_ids(tokenizer)
    fim = find_fim_tokens(tokenizer)
    args = ["generate", str(run_dir), "--max_new_tokens", str(NEW_TOKENS), "--device", "cpu"]
    for prefix, suffix in (("pub fn add(&mut self, word: &str) -> usize {\n", "\n    }\n"), ("def analyze_", "")):
        ids = [prefix_id, *text_ids(tokenizer, prefix), suffix_id, *(text_ids(tokenizer, suffix) if suffix else []),
               middle_id]
        assert infill_prompt_ids(tokenizer, fim, prefix, suffix) == ids, "the PSM layout of training"
        expected = tokenizer.decode(greedy(reference, prompt_ids_of(ids)), skip_special_tokens=True)
        assert main([*args, "--prefix", prefix, "--suffix", suffix]) == 0
        captured = capsys.readouterr()
        assert captured.out == expected + "\n", (prefix, suffix)


def prompt_ids_of(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids])


def with_file_headers(run_dir: Path, target: Path) -> Path:
    import yaml

    run = copy_run(run_dir, target)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["file_headers"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_infill_fills_the_masked_line_as_base_plus_adapter_would(run_dir, reference, tokenizer, tmp_path, capsys):
    from codetune.data.fim import line_cut_style
    from codetune.eval.infill import LineCut, cut_around_line

    run = with_file_headers(run_dir, tmp_path / "headers")
    repo = run_dir.parent.parent / "repo"
    file = repo / "src" / "counter_0.rs"
    text = file.read_text()
    lines = text.split("\n")
    assert lines[13].startswith("        let entry")
    # The tiny tokenizer merges a line break with the next line's indentation: the cut lies at line ends.
    assert line_cut_style(tokenizer) == "before"
    prefix, middle, suffix = "\n".join(lines[:13]), "\n" + lines[13], "\n" + "\n".join(lines[14:])
    assert prefix + middle + suffix == text
    assert cut_around_line(text, 14, "before") == LineCut(prefix, middle, suffix, "\n")
    prefix_id, suffix_id, middle_id, file_sep = sentinel_ids(tokenizer)
    ids = [file_sep, *text_ids(tokenizer, "src/counter_0.rs\n"), prefix_id, *text_ids(tokenizer, prefix), suffix_id,
           *text_ids(tokenizer, suffix), middle_id]
    new = greedy(reference, prompt_ids_of(ids))
    written = tokenizer.decode(new, skip_special_tokens=True)
    body = written[1:] if written.startswith("\n") else written
    ended = body.splitlines(keepends=True)[:1] != body.splitlines()[:1]
    why = ("the line ended" if ended else "the model ended the middle" if tokenizer.eos_token_id in new
           else f"cut at --max_new_tokens={NEW_TOKENS}: the line may go on")

    assert main(["generate", str(run), "--infill", f"{file}:14", "--max_new_tokens", str(NEW_TOKENS),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (body.splitlines()[0] if body else "") + "\n"
    # The last line: transformers may draw a weight-loading progress bar on stderr before it.
    assert captured.err.splitlines()[-1] == f"codetune generate: line 14 of {file}, filled in ({why}):", captured.err


def test_infill_header_path_is_relative_to_the_runs_repo_and_old_runs_have_none(run_dir, tmp_path, monkeypatch):
    from codetune.commands.generate import InfillTarget, header_path
    from codetune.run.finished import load_run_config

    repo = run_dir.parent.parent / "repo"
    inside = InfillTarget(str(repo / "src" / "nested" / "lib.rs"), 1, "")
    assert header_path(inside, str(repo)) == "src/nested/lib.rs"
    outside = InfillTarget(str(tmp_path / "x.rs"), 1, "")
    assert header_path(outside, str(repo)) == str(tmp_path / "x.rs")
    monkeypatch.chdir(repo / "src")  # a relative data.repo is read from the current directory, as fit was run
    assert header_path(InfillTarget("nested/lib.rs", 1, ""), ".") == "nested/lib.rs"
    assert header_path(InfillTarget("nested/lib.rs", 1, ""), None) == "nested/lib.rs"

    assert load_run_config(with_file_headers(run_dir, tmp_path / "headers")).file_headers is True
    old = copy_run(run_dir, tmp_path / "old")
    config = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text("\n".join(line for line in config.split("\n") if "file_headers" not in line))
    assert load_run_config(old).file_headers is False, "runs that predate data.file_headers had no headers"


def refuse_to_load_the_model(monkeypatch):
    """Requests refused up front never reach the model (a stand-in that fails loudly if called)."""
    import codetune.commands.generate as use

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded for a request that should have been refused first")

    monkeypatch.setattr(use, "load_tuned_model", loaded)


def test_bad_generate_requests_are_one_line_naming_the_flag(run_dir, tmp_path, capsys, monkeypatch):
    refuse_to_load_the_model(monkeypatch)
    code = tmp_path / "code.rs"
    code.write_text("fn a() {\n    1\n}\n")
    (tmp_path / "latin1.rs").write_bytes("// café\n".encode("latin-1"))
    (tmp_path / "empty.rs").write_text("")
    for args, expected in (
        ([], "nothing to generate: give one of --prompt TEXT"),
        (["--prompt", "fn", "--prefix", "a", "--suffix", "b"], "--prompt and --prefix/--suffix exclude each other"),
        (["--prompt", "fn", "--infill", f"{code}:1"], "--prompt and --infill exclude each other"),
        (["--prefix", "fn a() {"], "--prefix needs --suffix"),
        (["--suffix", ""], "--suffix needs --prefix"),
        (["--infill", str(code)], f"--infill {str(code)!r}: give FILE:LINE"),
        (["--infill", f"{code}:0"], "LINE '0' is not a positive integer"),
        (["--infill", f"{code}:two"], "LINE 'two' is not a positive integer"),
        (["--infill", f"{code}:4"], "code.rs has 3 lines; give a LINE from 1 to 3"),
        (["--infill", f"{tmp_path / 'missing.rs'}:1"], "missing.rs does not exist"),
        (["--infill", f"{tmp_path}:1"], "is not a file"),
        (["--infill", f"{tmp_path / 'latin1.rs'}:1"], "latin1.rs is not UTF-8 text (byte 6"),
        (["--infill", f"{tmp_path / 'empty.rs'}:1"], "empty.rs is empty"),
    ):
        assert main(["generate", str(run_dir), "--device", "cpu", *args]) == 2, args
        captured = capsys.readouterr()
        assert "codetune generate: error: " in captured.err and expected in captured.err, (args, captured.err)
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and not captured.out


def test_a_base_without_fim_tokens_is_refused_before_it_loads(run_dir, tmp_path, capsys, monkeypatch):
    import codetune.commands.generate as use
    from codetune.data.fim import fim_families_text

    refuse_to_load_the_model(monkeypatch)
    monkeypatch.setattr(use, "find_fim_tokens", lambda tokenizer: None)  # as for a hub base without sentinels
    code = tmp_path / "code.rs"
    code.write_text("fn a() {\n    1\n}\n")
    for args, flag in ((["--prefix", "fn a() {", "--suffix", "}"], "--prefix/--suffix"),
                       (["--infill", f"{code}:2"], "--infill")):
        assert main(["generate", str(run_dir), "--device", "cpu", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"codetune generate: error: {flag}: the base 'tiny' has no fill-in-the-middle tokens "
                              f"(looked for {fim_families_text()})"), err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_float16_generation_scales_the_residual_stream_as_training_did(run_dir, reference, tokenizer):
    """A Turing card generates in float16: the run's --model.float16_residual_scale (32 by default) is applied, the
    logits are the float32 ones up to float16 rounding, and scale 1 applies nothing."""
    from dataclasses import replace

    from codetune.run.finished import load_run_config
    from codetune.run.tuned import load_tuned_model

    config = load_run_config(run_dir)
    assert config.float16_residual_scale == 32
    model = load_tuned_model(config, torch.device("cpu"), torch.float16, quantize=False)
    decoder = model.get_base_model().model
    assert getattr(decoder, "_codetune_residual_scale", None) == 32
    ids = prompt_ids(tokenizer, PROMPTS[0])
    expected = logits(reference, ids)
    assert (logits(model, ids) - expected).abs().max() <= 2e-2 * expected.abs().max()
    off = load_tuned_model(replace(config, float16_residual_scale=1), torch.device("cpu"), torch.float16, False)
    assert not hasattr(off.get_base_model().model, "_codetune_residual_scale")


# -- what the commands print besides their answer ---------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_help_imports_no_training_stack(command):
    """`--help` (and a bad flag) answer before torch, transformers, peft or bitsandbytes are imported: they take
    seconds, and importing bitsandbytes may log a notice."""
    from helpers import imported_by

    assert imported_by(command, "--help") == []


def test_loading_the_tuned_model_hides_two_library_notices_and_nothing_else(run_dir, monkeypatch, caplog):
    """peft reads transformers' deprecated `is_gradient_checkpointing` (a real FutureWarning here); bitsandbytes logs
    that its `kernels` package is missing when it is imported on a CPU with AVX512-BF16, which this test emulates: the
    base loader logs that record as bitsandbytes' import does, with another record and another FutureWarning that
    must still show."""
    import logging
    import warnings

    import codetune.model.loading as loading
    from codetune.run.finished import load_run_config
    from codetune.run.tuned import load_tuned_model

    real = loading.load_causal_lm

    def loader_importing_bitsandbytes(*args, **kwargs):
        bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
        bnb.warning("another bitsandbytes notice")
        warnings.warn("another FutureWarning", FutureWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_causal_lm", loader_importing_bitsandbytes)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        load_tuned_model(load_run_config(run_dir), torch.device("cpu"), torch.float32, quantize=False)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == [
        "another bitsandbytes notice"]
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]


# Run as `python -c`: watches the moment bitsandbytes is imported, and asks whether its logger would drop the notice
# it logs then on a CPU with AVX512-BF16 (this one may have none), built as bitsandbytes builds it.
WATCH_BITSANDBYTES_IMPORT = """\
import importlib.abc, logging, sys
dropped = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":
            logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
            notice = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
            record = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 1, notice,
                                       (ModuleNotFoundError("No module named 'kernels'"),), None)
            dropped.append(not logger.filter(record))
sys.meta_path.insert(0, Watch())
from codetune.__main__ import main
status = main(sys.argv[1:])
print(status, dropped, file=sys.stderr)
"""


def test_generate_prints_its_completion_and_no_library_notice(run_dir):
    import subprocess
    import sys

    from helpers import subprocess_env

    result = subprocess.run([sys.executable, "-c", WATCH_BITSANDBYTES_IMPORT, "generate", str(run_dir), "--prompt",
                             "fn", "--max_new_tokens", "2", "--device", "cpu"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.stdout.startswith("fn") and result.stderr == "0 [True]\n", result.stderr
