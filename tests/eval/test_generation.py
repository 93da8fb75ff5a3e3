"""The generation engine that the evaluation and `codetune generate` share: left-padded batches that generate what
each prompt alone does, per-row stopping, and completions cut where each row ended."""

from __future__ import annotations

import copy

import pytest
import torch

from codetune.eval.generation import (Completion, Decoding, Request, generate, generate_requests, left_padded,
                                      never, text_ids)

BATCH_PROMPTS = ["fn", "def analyze_energy(values):\n", "pub struct Counter {\n    counts", "    return"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The embedded tiny tokenizer (it has Qwen's FIM sentinels), trained on the fixture sources."""
    from codetune.data.tokenizer import train_tokenizer
    from helpers import PY_FILE, RUST_FILE

    return train_tokenizer([RUST_FILE, PY_FILE], vocab_size=400)


def _ends_where_it_wrote(model, token: int, eos: int):
    """`model` writing EOS wherever it wrote `token` (their output rows swapped), so a row ends mid-batch."""
    with torch.no_grad():
        head = model.lm_head.weight
        head[[token, eos]] = head[[eos, token]]
    return model


@torch.no_grad()
def _alone(model, tokenizer, text: str, cap: int) -> Completion:
    """The reference: one prompt, unpadded, greedy; its new tokens up to EOS (included) or `cap`."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cap, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id in new
    return Completion(tokenizer.decode(new, skip_special_tokens=True), len(new), eos)


def test_a_left_padded_batch_generates_what_each_prompt_alone_does_when_pad_is_eos(tiny_tokenizer):
    """Prompts of 1 to 12 tokens in one batch (left-padded, masked) against each generated alone: same text, same
    new-token count. The tokenizer pads with EOS, as codetune does for a model without a pad token: the prompts'
    padding is EOS, and so is what generate writes after a row is done. One row ends with EOS at its 7th token
    while the others go on, and one stops at a smaller cap; the EOS is counted, the padding after it is not."""
    from codetune.data.tokens import pad_token_id
    from codetune.model.tiny import build_tiny_model

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None  # pad_token_id falls back to EOS
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id
    # Token 250 is the 7th that this random model writes after "pub struct Counter {\n    counts", and one the
    # other prompts never write: as EOS, it ends that row alone.
    model = _ends_where_it_wrote(build_tiny_model(tiny_tokenizer, seed=0).eval(), 250, tokenizer.eos_token_id)
    caps = [10, 10, 10, 5]
    requests = [Request(text, never, cap) for text, cap in zip(BATCH_PROMPTS, caps)]
    batched = generate_requests(model, tokenizer, requests, Decoding(), CPU)
    alone = [_alone(model, tokenizer, text, cap) for text, cap in zip(BATCH_PROMPTS, caps)]
    assert [c.new_tokens for c in alone] == [10, 10, 7, 5] and [c.eos for c in alone] == [False, False, True, False]
    assert batched == alone
    # Why each row stopped: its cap, or (None) its EOS.
    rows = text_ids(tokenizer, BATCH_PROMPTS)
    assert generate(model, tokenizer, rows, [never] * 4, caps, Decoding(), CPU).reasons == ["cap", "cap", None, "cap"]


def test_one_row_is_what_model_generate_writes_greedy_or_seeded_sampling(tiny_tokenizer):
    """`codetune generate`'s path: one unpadded row running to its cap is model.generate's own output, greedy, and
    sampled after the same seed; the model's train mode is restored after."""
    from codetune.model.tiny import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, seed=0).train()
    ids = text_ids(tiny_tokenizer, ["def analyze_"])[0]
    tensor = torch.tensor([ids])
    for decoding in (Decoding(), Decoding(do_sample=True, temperature=1.5, top_p=0.9)):
        torch.manual_seed(7)
        out = generate(model, tiny_tokenizer, [ids], [never], [12], decoding, CPU)
        assert model.training, "the mode it had"
        model.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            new = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=12,
                                 pad_token_id=tiny_tokenizer.pad_token_id, **decoding.generate_kwargs())[0, len(ids):]
        model.train()
        assert out.completions[0].text == tiny_tokenizer.decode(new, skip_special_tokens=True), decoding
        assert out.completions[0].new_tokens == len(new) and out.reasons == ["cap" if len(new) == 12 else None]


def test_left_padding_and_its_mask():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_sampling_settings_reach_generate_only_when_sampling():
    assert Decoding(temperature=0.5, top_p=0.9).generate_kwargs() == {"do_sample": False}
    assert Decoding(True, 0.5, 0.9).generate_kwargs() == {"do_sample": True, "temperature": 0.5, "top_p": 0.9}
