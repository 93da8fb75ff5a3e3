"""Infill requests for one line of a file (`codetune generate --infill`): the cut around the line, the line in a
generated middle, the rule that stops generation there, and the request's ids."""

from __future__ import annotations

import pytest
import torch

from codetune.errors import ConfigError
from codetune.eval.infill import LineCut, cut_around_line, infill_prompt_ids, line_ended, masked_line


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tiny tokenizer (Qwen's FIM sentinels, GPT-2's byte-level BPE), trained on the fixture sources."""
    from codetune.data.tokenizer import train_tokenizer
    from helpers import PY_FILE, RUST_FILE

    return train_tokenizer([RUST_FILE, PY_FILE], vocab_size=400)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cut_around_line_rebuilds_the_file_and_cuts_where_tokens_break():
    from codetune.eval.prompts import split_lines

    text = "a\n    b\n  c\n"
    assert cut_around_line(text, 2, "after") == LineCut("a\n", "    b\n", "  c\n", "")
    assert cut_around_line(text, 2, "before") == LineCut("a", "\n    b", "\n  c\n", "\n")
    assert cut_around_line(text, 1, "before") == LineCut("", "a", "\n    b\n  c\n", "")
    assert cut_around_line(text, 3, "after") == LineCut("a\n    b\n", "  c\n", "", "")
    assert cut_around_line("x\r\n  y\r\n", 2, "before") == LineCut("x", "\r\n  y", "\r\n", "\r\n")
    for text, lines in (("a\n    b\n  c\n", 3), ("a\n    b\n  c", 3), ("x", 1), ("x\r\n  y\r\n", 2),
                        ("\n\nq\n", 3), ("", 0)):
        assert len(split_lines(text)) == lines, text
        for line in range(1, lines + 1):
            for style in ("after", "before"):
                cut = cut_around_line(text, line, style)
                assert cut.prefix + cut.middle + cut.suffix == text, (text, line, style)
                assert cut.middle.startswith(cut.lead)


def test_masked_line_skips_the_lead_and_ends_at_the_next_line_break():
    assert masked_line("\n    b\n  c", "\n") == ("    b", True)
    assert masked_line("\n   ", "\n") == ("   ", False)
    assert masked_line("x = 1\r\ny", "") == ("x = 1", True)
    assert masked_line("\n", "") == ("", True)
    assert masked_line("\r", "\r\n") == ("", False), "half of a CRLF lead ends nothing"
    assert masked_line("", "\n") == ("", False)


def test_line_ended_stops_generation_once_the_masked_line_has_ended(tokenizer):
    from codetune.eval.stopping import CompletionStop

    new = text_ids(tokenizer, "\n        let x = 1;\n        x\n")
    breaks = [k for k, t in enumerate(new) if "\n" in tokenizer.decode([t])]
    assert breaks[0] == 0 and len(breaks) >= 2
    prompt = [7, 7, 7]
    for lead, expected in (("\n", breaks[1] + 1), ("", breaks[0] + 1)):
        stop = CompletionStop(tokenizer, len(prompt), [line_ended(lead)], [64])
        verdicts = [bool(stop(torch.tensor([prompt + new[:k]]), None)[0]) for k in range(1, len(new) + 1)]
        assert verdicts.index(True) + 1 == expected and stop.stopped_at == [expected], lead
        assert stop.reasons == ["complete"]
    capped = CompletionStop(tokenizer, len(prompt), [line_ended("\n")], [2])
    assert bool(capped(torch.tensor([prompt + new[:2]]), None)[0]) and capped.reasons == ["cap"]


def test_the_request_ids_are_the_evals_text_request_tokenized(tokenizer):
    """Sentinels by id and each part tokenized alone: the same ids as the FIM eval's request written as text, with
    and without the file header."""
    from codetune.data.fim import find_fim_tokens

    fim = find_fim_tokens(tokenizer)
    for prefix, suffix in (("fn add(a: i32) -> i32 {\n", "\n}\n"), ("def analyze_", "")):
        ids = infill_prompt_ids(tokenizer, fim, prefix, suffix)
        assert ids == [fim.prefix, *text_ids(tokenizer, prefix), fim.suffix,
                       *(text_ids(tokenizer, suffix) if suffix else []), fim.middle]
        assert ids == text_ids(tokenizer, fim.psm_prompt(prefix, suffix))
        headed = infill_prompt_ids(tokenizer, fim, prefix, suffix, "src/lib.rs")
        assert headed == [fim.file_sep, *text_ids(tokenizer, "src/lib.rs\n"), *ids]
        assert headed == text_ids(tokenizer, fim.psm_prompt(prefix, suffix, fim.header("src/lib.rs")))


def test_a_header_needs_a_file_separator_token(tokenizer):
    from dataclasses import replace

    from codetune.data.fim import find_fim_tokens

    fim = replace(find_fim_tokens(tokenizer), file_sep=None, file_sep_text=None)
    assert infill_prompt_ids(tokenizer, fim, "a", "b")[0] == fim.prefix
    with pytest.raises(ConfigError, match="data.file_headers true, but its qwen tokenizer has no file separator"):
        infill_prompt_ids(tokenizer, fim, "a", "b", "src/lib.rs")
