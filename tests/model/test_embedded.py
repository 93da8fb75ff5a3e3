"""The embedded model as shipped: one 16-bit weights file under 25 MB beside its model card, loaded offline by name
through the same path as any local model directory, with Qwen2.5-Coder's FIM and repository tokens by name; and
what a pretrained base makes testable at all: tuning it on a repository raises held-out next-line exact match,
completion chrF and infilled-body chrF above the base's, for every seed tried."""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from pathlib import Path

import pytest

from codetune.__main__ import main
from codetune.data.fim import find_fim_tokens
from codetune.data.model_source import EMBEDDED_DIR, EMBEDDED_NAME, local_model_dir, model_location
from codetune.data.tokens import load_tokenizer

from helpers import ROOT


def test_one_16_bit_weights_file_under_25_mb_beside_its_model_card():
    weights = sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weights == ["model.safetensors"]
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size < 25 * 10**6
    header_size = int.from_bytes((EMBEDDED_DIR / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((EMBEDDED_DIR / "model.safetensors").read_bytes()[8:8 + header_size])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    card = (EMBEDDED_DIR / "README.md").read_text()
    for must in ("tokio", "requests", "make embedded-model", "Apache-2.0", "next-line exact match",
                 "FIM line exact match", "held-out perplexity"):
        assert must in card, must


def test_the_name_resolves_to_the_package_directory_wherever_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / EMBEDDED_NAME).mkdir()  # a directory of that name does not shadow the built-in model
    assert model_location(EMBEDDED_NAME) == str(EMBEDDED_DIR) and local_model_dir(EMBEDDED_NAME) == EMBEDDED_DIR
    assert EMBEDDED_DIR.parent == ROOT / "codetune"
    assert model_location("./embedded") == "./embedded"


def test_its_tokenizer_names_the_fim_and_repository_tokens_as_qwen_does():
    tokenizer = load_tokenizer(EMBEDDED_NAME, ())
    tokens = find_fim_tokens(tokenizer)
    assert tokens is not None
    assert (tokens.prefix_text, tokens.middle_text, tokens.suffix_text) == \
        ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
    assert tokens.file_sep_text == "<|file_sep|>"
    vocab = tokenizer.get_vocab()
    assert {"<|repo_name|>", "<|fim_pad|>", "<|endoftext|>"} <= set(vocab)
    assert tokenizer.eos_token == "<|endoftext|>"
    text = "fn main() {\n    println!(\"{}\", 1);\n}\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


HANDLER = textwrap.dedent('''\
    """Handlers of the {name} route."""

    from relay.registry import Registry, Request, Response, handler


    @handler("{name}")
    def handle_{name}(request: Request) -> Response:
        registry = Registry.current()
        route = registry.route("{name}", version={version})
        return route.dispatch(request)


    @handler("{name}_health")
    def check_{name}(request: Request) -> Response:
        registry = Registry.current()
        return registry.health("{name}")
    ''')
NAMES = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega orbit comet nova pulse quark "
         "ember frost cedar maple aspen willow birch").split()


def write_relay_repo(root: Path) -> Path:
    """A repository with a house style no pretrained model can know: every handler looks up the current
    `Registry` and dispatches through its route, by the handler's name."""
    (root / "relay" / "handlers").mkdir(parents=True)
    for i, name in enumerate(NAMES):
        (root / "relay" / "handlers" / f"{name}.py").write_text(HANDLER.format(name=name, version=i % 3 + 1))
    return root


def completion_figures(run: Path) -> tuple[dict, dict]:
    evaluation = json.loads((run / "MANIFEST.json").read_text())["phase_results"]["phase_5_evaluation"]
    return evaluation["base"], evaluation["final"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuning_on_a_repository_raises_held_out_completion_figures_above_the_base(tmp_path, seed):
    repo = write_relay_repo(tmp_path / "repo")
    args = ["fit", "--config", str(ROOT / "configs" / "training_config.yaml"),
            "--config", str(ROOT / "configs" / "presets" / "demo.yaml"), "--data.repo", str(repo),
            "--runs_dir", str(tmp_path / "runs"), "--run_name", "relay", "--seed_everything", str(seed),
            "--data.cache_dir", str(tmp_path / "token-cache"), "--data.seq_len", "128", "--data.val_fraction", "0.25",
            "--trainer.max_steps", "40", "--trainer.val_check_interval", "40", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--generation.prompts", "[]"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    base, tuned = completion_figures(tmp_path / "runs" / "relay")
    assert tuned["next_line_exact_match"] > base["next_line_exact_match"] + 0.25
    assert tuned["chrf"] > base["chrf"] and tuned["fim_chrf"] > base["fim_chrf"]
    assert tuned["perplexity"] < base["perplexity"]
    # Not asserted: FIM line exact match. At this size the tuned model infills a line in the repository's style
    # but not the masked one when the request is PSM (prefix first, what editors send); docs/demo.md.
