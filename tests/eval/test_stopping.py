"""Early stopping of eval generations: the scored prefix, the language-sample rule, and a greedy run of
the tiny model stopped early that scores exactly as the same run at full length."""

from __future__ import annotations

import contextlib

import pytest
import torch

from codetune.callbacks.generation_eval import GenerationEval
from codetune.eval.generation import Request
from codetune.eval.metrics import chrf, mean_next_line_exact_match, scored_prefix
from codetune.eval.prompts import repo_prompts
from codetune.eval.scoring import completion_metrics
from codetune.eval.stopping import sample_complete
from helpers import PY_FILE, RUST_FILE


@pytest.mark.parametrize(("generated", "truth", "expected"), [
    ("\n    a\n    b\n    c", "    a\n    b\n", "\n    a\n"),  # 2 truth lines: the generation's first 2 lines
    ("\n    a", "    a\n    b\n", None),  # the first non-blank line is not finished: it may still grow
    ("\n\n\n    a\nrest", "x\n", "\n\n\n    a\n"),  # exact match reads past blank lines
    ("x\r\ny\nz", "1\n2\n", "x\r\ny\n"),  # any line break counts, as in str.splitlines
    ("\n" * 30 + "a\n", "l\n" * 25, "\n" * 30 + "a\n"),  # chrF reads 20 lines at most, exact match a 31st
    ("", "a\n", None),
])
def test_scored_prefix_is_what_the_metrics_read(generated, truth, expected):
    assert scored_prefix(generated, truth) == expected


@pytest.mark.parametrize(("full", "truth"), [
    ("\n    let x = 1;\n    x + 1\n}\n\nfn other() {}\n", "    let x = 1;\n    x\n}\n"),
    ("\n\n    return a\n  b = 2\n\n\nc\n", "    return a\n"),
    ("    same\n" * 23, "    same\n" * 20),
])
def test_every_prefix_past_the_scored_one_scores_the_same(full, truth):
    prefix = scored_prefix(full, truth)
    assert prefix is not None and full.startswith(prefix)
    for end in [*range(len(prefix), len(full), 3), len(full)]:
        cut = full[:end]
        assert scored_prefix(cut, truth) == prefix
        assert chrf([cut], [truth]) == chrf([full], [truth])
        assert mean_next_line_exact_match([cut], [truth]) == mean_next_line_exact_match([full], [truth])
    # Before it, the prefix is not there yet.
    assert all(scored_prefix(full[:end], truth) is None for end in range(len(prefix)))


def test_a_language_sample_ends_at_a_blank_line_after_its_first_block():
    rust = "(x: u32) -> u32 {\n    let y = x;\n\n    y\n}\n"
    assert not sample_complete(rust)  # the blank line inside the body does not end it
    assert sample_complete(rust + "\n")
    python = "energy(values):\n    total = 0\n\n    return total\n\n\ndef other():\n"
    assert not sample_complete(python)
    assert sample_complete(python + "\n")
    assert not sample_complete("os\nimport sys\n\n")  # no block opened


def test_a_line_still_being_written_is_not_judged():
    assert not sample_complete("(x) {\n    x\n}\n")
    assert sample_complete("(x) {\n    x\n}\n\n")
    assert sample_complete("(x) {\n    x\n}\n\nfn next")


class _Precision:
    def forward_context(self):
        return contextlib.nullcontext()


class _TinyModule:
    """What `_generate_batch` reads of the LightningModule: tokenizer, model, device, the trainer's precision."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model, self.device = tokenizer, model, torch.device("cpu")
        self.trainer = type("T", (), {"precision_plugin": _Precision()})()


@pytest.fixture(scope="module")
def tiny():
    from codetune.data.tokenizer import train_tokenizer
    from codetune.model.tiny import build_tiny_model

    files = ([(f"src/c{i}.rs", "rust", RUST_FILE.replace("Counter", f"C{i}")) for i in range(3)]
             + [(f"p{i}.py", "python", PY_FILE.replace("Energy", f"E{i}")) for i in range(3)])
    tokenizer = train_tokenizer([text for _, _, text in files], vocab_size=512)
    model = build_tiny_model(tokenizer, seed=0).eval()
    # A random model rarely writes a line break; tokens holding one are made likelier (their output rows
    # scaled), so the completions have lines and the scored prefix is reached at different steps per row.
    with torch.no_grad():
        model.lm_head.weight[[i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]] *= 3
        # Nor may it end at once: which random init writes EOS early is chance (it moved when the tokenizer gained
        # the FIM sentinels), and a row ended by EOS says nothing about stopping early.
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    return _TinyModule(tokenizer, model), repo_prompts(files, 6)


def test_a_completion_stopped_early_scores_as_the_full_greedy_one(tiny):
    module, prompts = tiny
    evaluation = GenerationEval(max_new_tokens=48, batch_size=len(prompts))
    early = evaluation._generate(module, evaluation._requests(prompts))
    full = evaluation._generate(module, [Request(p.model_input, lambda text: False, 48) for p in prompts])
    assert all(f.new_tokens == 48 and not f.eos for f in full)
    # Same greedy run: each early completion is the start of the full one, and most stopped well before the cap.
    assert all(f.text.startswith(e.text) for e, f in zip(early, full))
    stopped = [e.new_tokens for e in early if e.new_tokens < 48]
    assert len(stopped) >= len(prompts) // 2 and sum(e.new_tokens for e in early) < 0.6 * 48 * len(prompts), early
    assert not any(e.eos for e in early)
    early_metrics = completion_metrics(prompts, early)
    assert early_metrics == completion_metrics(prompts, full)
    # Syntax is judged unless no completion got past the two non-blank lines a cut may leave unfinished (and a
    # line it stopped in); blank lines, which this random model writes a lot of, say nothing about syntax.
    assert early_metrics["syntax_valid"] is not None or all(
        sum(1 for line in e.text.splitlines() if line.strip()) <= 3 for e in early)


def test_each_row_keeps_its_own_token_cap(tiny):
    module, prompts = tiny
    evaluation = GenerationEval(max_new_tokens=16, batch_size=3)
    never = lambda text: False  # noqa: E731
    out = evaluation._generate(module, [Request(prompts[0].model_input, never, 5),
                                        Request(prompts[1].model_input, never, 16),
                                        Request(prompts[2].model_input, never, 11)])
    assert [c.new_tokens for c in out] == [5, 16, 11] and not any(c.eos for c in out)
    # A cut row is the start of what the same prompt writes uncut.
    alone = evaluation._generate(module, [Request(prompts[0].model_input, never, 16)])
    assert alone[0].text.startswith(out[0].text) and len(alone[0].text) > len(out[0].text)


def test_language_samples_stop_at_sample_tokens_never_above_max_new_tokens(tiny):
    module, _ = tiny
    short = GenerationEval(prompts=["fn process", "def analyze_"], max_new_tokens=40, sample_tokens=7)
    assert [r.cap for r in short._requests([])] == [7, 7]
    capped = GenerationEval(prompts=["fn process"], max_new_tokens=4, sample_tokens=64)
    assert [r.cap for r in capped._requests([])] == [4]
    out = short._generate(module, short._requests([]))
    assert all(c.new_tokens <= 7 for c in out)


class _PieceTokenizer:
    """Token id i decodes to PIECES[i] (2 is EOS, decoded as nothing)."""

    PIECES = {1: "ab", 2: "", 3: "\n", 4: "\ufffd", 5: "c\n  d"}
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_rows_are_judged_only_when_a_line_break_may_have_been_written():
    from codetune.eval.stopping import CompletionStop

    seen = []

    def rule(text):
        seen.append(text)
        return text.count("\n") >= 2

    stop = CompletionStop(_PieceTokenizer(), prompt_width=1, rules=[rule, rule, rule], caps=[9, 9, 3])
    steps = [[1, 1, 1], [3, 1, 1], [1, 2, 1], [4, 0, 1], [5, 0, 1]]  # a column per step, a row per prompt
    done = [stop(torch.tensor([[7] + [step[r] for step in steps[:n]] for r in range(3)]), None).tolist()
            for n in range(1, len(steps) + 1)]
    # Row 0 is judged after "\n", U+FFFD (part of a character) and "c\n  d"; done at its second line break.
    assert seen == ["ab\n", "ab\nab\ufffd", "ab\nab\ufffdc\n  d"]
    assert [d[0] for d in done] == [False, False, False, False, True] and stop.stopped_at[0] == 5
    # Row 1 ended with EOS (generate's own stop; then padded); row 2 stops at its cap of 3 tokens.
    assert stop.stopped_at[1] is None and [d[2] for d in done] == [False, False, True, True, True]
    assert stop.reasons == ["complete", None, "cap"]
