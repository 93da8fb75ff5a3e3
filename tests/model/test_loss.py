"""Chunked causal-LM loss: same numbers as the plain loss, one chunk of logits at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codetune.model.loss import IGNORE_INDEX, causal_lm_loss_sum, shift_targets

B, T, H, V = 3, 12, 16, 40


class CountingHead(nn.Module):
    """A Linear head that records how many tokens each call sees."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, vocab, bias=False)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.linear(x)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, CountingHead, torch.Tensor]:
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, H, requires_grad=True)
    head = CountingHead(H, V)
    labels = torch.randint(0, V, (B, T))
    return hidden, head, labels


def _reference(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)[:, :-1].float().flatten(0, 1)
    return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _loss_and_grads(loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, head, labels = _inputs()
    labels[0, 4] = IGNORE_INDEX
    loss = loss_fn(hidden, head, labels)
    loss.backward()
    return loss.detach(), hidden.grad, head.linear.weight.grad


# 1 and 7 chunk the 36 tokens unevenly, 5 divides neither T nor B*T, 12 == T (one chunk per row),
# 36 == B*T and larger values take the plain path, as does None.
@pytest.mark.parametrize("chunk_size", [1, 5, 7, T, B * T, 1000, None])
def test_loss_and_grads_equal_plain_path(chunk_size: int | None) -> None:
    ref_loss, ref_hidden_grad, ref_weight_grad = _loss_and_grads(_reference)
    loss, hidden_grad, weight_grad = _loss_and_grads(lambda h, m, y: causal_lm_loss_sum(h, m, y, chunk_size)[0])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_grad, ref_hidden_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, ref_weight_grad, rtol=1e-5, atol=1e-6)


def test_count_is_number_of_shifted_targets() -> None:
    hidden, head, labels = _inputs()
    labels[0, 4] = IGNORE_INDEX
    # labels[:, 0] is never a target, so masking it changes nothing.
    labels[1, 0] = IGNORE_INDEX
    _, n_targets = causal_lm_loss_sum(hidden, head, labels, chunk_size=5)
    assert n_targets.dtype == torch.int64
    assert n_targets.item() == B * (T - 1) - 1


def test_chunks_hold_at_most_chunk_size_tokens_and_are_recomputed_in_backward() -> None:
    hidden, head, labels = _inputs()
    loss_sum, _ = causal_lm_loss_sum(hidden, head, labels, chunk_size=7)
    # 36 flattened tokens in chunks of 7: five of 7, and a last one of 1 that holds only the
    # final position of the last row, which has no target, so it is skipped.
    assert head.calls == [7, 7, 7, 7, 7]
    loss_sum.backward()
    # Backward runs the head again, one chunk at a time: the logits were not kept.
    assert head.calls == [7, 7, 7, 7, 7] * 2


def test_masked_file_boundaries_and_padding() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(2, 8, H, requires_grad=True)
    head = CountingHead(H, V)
    x = IGNORE_INDEX
    # Row 0: two files packed in one window, the first token of the second file masked.
    # Row 1: a short document padded to the window length.
    labels = torch.tensor([[1, 2, 3, x, 4, 5, 6, 7], [1, 2, 3, 4, x, x, x, x]])
    assert shift_targets(labels).tolist() == [[2, 3, x, 4, 5, 6, 7, x], [2, 3, 4, x, x, x, x, x]]

    loss_sum, n_targets = causal_lm_loss_sum(hidden, head, labels, chunk_size=4)
    assert n_targets.item() == 6 + 3
    # Chunks of 4 over the 16 flattened positions: the last one (row 1, positions 4-7) has no
    # target and is skipped.
    assert head.calls == [4, 4, 4]
    loss_sum.backward()
    torch.testing.assert_close(loss_sum.detach(), _reference(hidden, head, labels).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(hidden.grad[1, 3:], torch.zeros(5, H))
    assert torch.equal(hidden.grad[0, 2], torch.zeros(H))
    assert hidden.grad[0, 3].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [4, None])
def test_all_masked_batch_is_zero_not_nan(chunk_size: int | None) -> None:
    hidden, head, _ = _inputs()
    labels = torch.full((B, T), IGNORE_INDEX)
    loss_sum, n_targets = causal_lm_loss_sum(hidden, head, labels, chunk_size=chunk_size)
    assert loss_sum.item() == 0.0
    assert n_targets.item() == 0
    loss_sum.backward()
    assert torch.equal(hidden.grad, torch.zeros(B, T, H))
    assert torch.equal(head.linear.weight.grad, torch.zeros(V, H))


def test_bf16_head_gives_fp32_loss_equal_to_upcast_reference() -> None:
    hidden, head, labels = _inputs()
    head = head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    loss_sum, _ = causal_lm_loss_sum(hidden, head, labels, chunk_size=5)
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum, _reference(hidden, head, labels), rtol=1e-5, atol=1e-4)
    loss_sum.backward()
    assert hidden.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "1024"])
def test_rejects_bad_chunk_size_naming_the_flag(bad: object) -> None:
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match=r"--model\.loss_chunk_size .* got " + repr(bad).replace(".", r"\.")):
        causal_lm_loss_sum(hidden, head, labels, chunk_size=bad)


def test_rejects_labels_not_matching_hidden() -> None:
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match=r"labels \[B, T\]"):
        causal_lm_loss_sum(hidden, head, labels[:, 1:], chunk_size=4)


def test_matches_hf_loss_and_lora_grads_on_tiny_llama() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    # Dimensions are multiples of 32, as the real kernels want; the model is tiny for CPU speed.
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = transformers.LlamaForCausalLM(config)
    # init_lora_weights=False gives LoRA B non-zero values, so every LoRA matrix gets a gradient.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora).eval()
    input_ids = torch.randint(0, 512, (2, 16))
    labels = input_ids.clone()
    labels[0, 9] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX
    n_expected = 2 * 15 - 1 - 4

    hf_loss = model(input_ids=input_ids, labels=labels).loss * n_expected
    hf_loss.backward()
    hf_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    causal_lm = model.base_model.model
    hidden = causal_lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
    loss_sum, n_targets = causal_lm_loss_sum(hidden, causal_lm.lm_head, labels, chunk_size=5)
    loss_sum.backward()

    assert n_targets.item() == n_expected
    torch.testing.assert_close(loss_sum, hf_loss, rtol=1e-5, atol=1e-5)
    lora_names = [name for name in hf_grads if "lora_" in name]
    # q_proj, v_proj in 2 layers plus lm_head, each with an A and a B matrix.
    assert len(lora_names) == (2 * 2 + 1) * 2
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)
