import numpy as np
import pytest
import torch

from codetune.data.packing import IGNORE_INDEX, pack_windows, window_labels
from codetune.data.split import split_paths

EOS, PAD = 2, 0


def ids(*values):
    return np.asarray(values, dtype=np.int32)


def test_isolated_packing_restarts_positions_at_files_and_windows():
    windows = pack_windows([ids(10, 11, 12), ids(20, 21), ids(30, 31, 32, 33, 34)], seq_len=4, eos_id=EOS,
                           pad_id=PAD, mode="isolated")
    # stream: 10 11 12 E | 20 21 E | 30 31 32 33 34 E  -> 13 tokens -> 4 windows, 3 pads
    assert windows.input_ids.tolist() == [[10, 11, 12, 2], [20, 21, 2, 30], [31, 32, 33, 34], [2, 0, 0, 0]]
    assert windows.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert windows.n_real.tolist() == [4, 4, 4, 1]
    assert windows.efficiency == pytest.approx(13 / 16)


def test_concat_packing_runs_positions_across_files():
    windows = pack_windows([ids(10, 11, 12), ids(20, 21)], seq_len=4, eos_id=EOS, pad_id=PAD, mode="concat")
    assert windows.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]  # padding sits at position 0
    assert windows.input_ids.tolist() == [[10, 11, 12, 2], [20, 21, 2, 0]]


def test_labels_mask_file_starts_and_padding():
    windows = pack_windows([ids(10, 11, 12), ids(20, 21), ids(30, 31, 32, 33, 34)], 4, EOS, PAD, "isolated")
    labels = window_labels(windows.input_ids, windows.position_ids, windows.n_real, "isolated")
    m = IGNORE_INDEX
    assert labels.tolist() == [[m, 11, 12, 2], [m, 21, 2, m], [m, 32, 33, 34], [m, m, m, m]]
    concat = pack_windows([ids(10, 11, 12), ids(20, 21)], 4, EOS, PAD, "concat")
    labels = window_labels(concat.input_ids, concat.position_ids, concat.n_real, "concat")
    assert labels.tolist() == [[10, 11, 12, 2], [20, 21, 2, m]]


def test_every_token_is_packed_once_and_efficiency_is_high():
    rng = np.random.default_rng(0)
    files = [rng.integers(3, 1000, size=int(n), dtype=np.int32) for n in rng.integers(1, 3000, size=400)]
    windows = pack_windows(files, seq_len=512, eos_id=EOS, pad_id=PAD)
    real = windows.input_ids.reshape(-1)[: int(windows.n_real.sum())]
    expected = np.concatenate([np.append(f, EOS) for f in files])
    assert np.array_equal(real, expected)
    assert windows.efficiency >= 0.995


def test_isolated_window_logits_equal_file_alone():
    """Window [A, B]: B's logits equal B alone; with concat packing they differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    a, b = ids(5, 6, 7, 8, 9), ids(11, 12, 13, 14)
    alone = model(input_ids=torch.tensor([[*b, EOS]]), use_cache=False).logits[0]
    for mode, equal in (("isolated", True), ("concat", False)):
        w = pack_windows([a, b], seq_len=11, eos_id=EOS, pad_id=PAD, mode=mode)
        out = model(input_ids=torch.from_numpy(w.input_ids).long(),
                    position_ids=torch.from_numpy(w.position_ids).long(), use_cache=False).logits[0]
        packed_b = out[len(a) + 1:len(a) + 1 + len(b) + 1]
        assert torch.allclose(packed_b, alone, atol=1e-5) is equal, mode


def test_split_is_deterministic_disjoint_and_never_empty():
    paths = [f"src/file_{i}.rs" for i in range(50)]
    train, val = split_paths(paths, 0.2, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(paths)
    train_r, val_r = split_paths(list(reversed(paths)), 0.2, seed=0)
    assert (set(train_r), set(val_r)) == (set(train), set(val)), "membership must not depend on order"
    assert 3 <= len(val) <= 20
    # Adding files never moves an existing file to the other side.
    train2, val2 = split_paths(paths + ["new.rs"], 0.2, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert split_paths(["a.py", "b.py"], 0.01)[1] != [] and split_paths(["a.py", "b.py"], 0.99)[0] != []
