"""Fill-in-the-middle samples: sentinels found by name, line-aware cuts, pieces that fit a window, rates, packing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from codetune.data.datamodule import CodeDataModule
from codetune.data.fim import (FimCut, MiddleMix, NewlineTable, epoch_cut, fim_sample, find_fim_tokens, is_fim,
                               line_cut_style, pieces, training_samples)
from codetune.data.packing import IGNORE_INDEX, pack_samples, window_labels
from codetune.errors import ConfigError
from codetune.data.tokenizer import QWEN2_SPLIT, train_tokenizer
from helpers import PY_FILE, RUST_FILE

ROOT = Path(__file__).resolve().parents[2]
EOS = 2


def bpe(texts, special):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                              show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special[0])


@pytest.fixture(scope="module")
def tiny():
    return train_tokenizer([RUST_FILE, PY_FILE] * 4, vocab_size=512)


def fim_check_module():
    spec = importlib.util.spec_from_file_location("fim_samples_bench", ROOT / "bench" / "fim_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sentinels_are_found_by_name_for_each_family(tiny):
    qwen = find_fim_tokens(tiny)
    vocab = tiny.get_vocab()
    assert qwen.family == "qwen"
    assert (qwen.prefix, qwen.suffix, qwen.middle, qwen.file_sep) == (
        vocab["<|fim_prefix|>"], vocab["<|fim_suffix|>"], vocab["<|fim_middle|>"], vocab["<|file_sep|>"])
    starcoder = find_fim_tokens(bpe([PY_FILE], ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>",
                                                "<file_sep>"]))
    assert (starcoder.family, starcoder.prefix_text, starcoder.file_sep_text) == ("starcoder", "<fim_prefix>",
                                                                                  "<file_sep>")
    assert find_fim_tokens(bpe([PY_FILE], ["<|endoftext|>", "<fim_prefix>", "<fim_suffix>"])) is None, \
        "all three sentinels of a family are needed"
    assert find_fim_tokens(bpe([PY_FILE], ["<|endoftext|>"])) is None


def test_boundaries_touch_a_line_break_and_pieces_rejoin_the_file(tiny):
    table = NewlineTable.of(tiny)
    ids = np.array(tiny(RUST_FILE * 3, add_special_tokens=False)["input_ids"])
    boundaries = table.boundaries(ids)
    assert len(boundaries) >= RUST_FILE.count("\n")  # at least one per line break
    for k in boundaries:
        assert tiny.decode(ids[:k]).endswith("\n") or tiny.decode(ids[k:]).startswith("\n")
    cuts = pieces(len(ids), boundaries, budget=60)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(ids) and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(0 < end - start <= 60 for start, end in cuts)
    assert all(end in set(boundaries.tolist()) for _, end in cuts[:-1]), "pieces end at line breaks"
    assert "".join(tiny.decode(ids[a:b]) for a, b in cuts) == RUST_FILE * 3
    lengths = [b - a for a, b in cuts]
    assert max(lengths) - min(lengths) < 30, "near-equal pieces, not full ones and a stub"


def test_a_line_longer_than_a_window_is_hard_cut():
    assert pieces(10, np.array([], dtype=np.int64), budget=4) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_a_sample_holds_its_sentinels_in_order_and_its_parts_rejoin(tiny, order):
    tokens = find_fim_tokens(tiny)
    ids = np.array(tiny(PY_FILE, add_special_tokens=False)["input_ids"])
    b = NewlineTable.of(tiny).boundaries(ids)
    cut = FimCut(order, int(b[3]), int(b[7]))
    header = np.array([tokens.file_sep, 50, 51])
    sample = fim_sample(ids, cut, tokens, EOS, header).tolist()
    p, m, s = ids[:cut.middle_start].tolist(), ids[cut.middle_start:cut.middle_end].tolist(), ids[cut.middle_end:].tolist()
    if order == "psm":
        assert sample == [*header, tokens.prefix, *p, tokens.suffix, *s, tokens.middle, *m, EOS]
    else:
        assert sample == [*header, tokens.prefix, tokens.suffix, *s, tokens.middle, *p, *m, EOS]
    assert tiny.decode(p) + tiny.decode(m) + tiny.decode(s) == PY_FILE


def test_draws_are_seeded_per_piece_and_hit_the_asked_rates():
    boundaries = np.arange(1, 40)
    def draw(seed: int, path: str, fim_rate: float, spm_rate: float, epoch: int = 0) -> FimCut | None:
        return epoch_cut(seed, path, 0, 40, boundaries, spm_rate, epoch) if is_fim(seed, path, 0, fim_rate) else None

    cuts = [draw(0, f"src/f{i}.rs", 0.3, 0.25) for i in range(4000)]
    again = [draw(0, f"src/f{i}.rs", 0.3, 0.25) for i in range(4000)]
    assert cuts == again
    fim = [c for c in cuts if c is not None]
    # Binomial: 4000 x 0.3 = 1200 +- 29 (one standard error); 1200 x 0.25 = 300 +- 15.
    assert abs(len(fim) - 1200) < 4 * 29
    assert abs(sum(c.order == "spm" for c in fim) - 0.25 * len(fim)) < 4 * 15
    assert all(0 <= c.middle_start < c.middle_end <= 40 for c in fim), "the middle is never empty"
    assert {c.middle_start for c in fim} >= {0, 20}, "cuts spread over the boundaries, the piece's start included"
    assert draw(1, "src/f0.rs", 1.0, 0.5) != draw(2, "src/f0.rs", 1.0, 0.5)
    assert draw(0, "src/f0.rs", 1.0, 0.5, epoch=1) != draw(0, "src/f0.rs", 1.0, 0.5), "each epoch cuts anew"


def test_samples_fit_their_window_and_left_to_right_pieces_stay_one_segment(tiny):
    tokens, table = find_fim_tokens(tiny), NewlineTable.of(tiny)
    texts = [RUST_FILE * 4, PY_FILE, RUST_FILE]
    files = [np.array(tiny(t, add_special_tokens=False)["input_ids"]) for t in texts]
    paths = ["a.rs", "b.py", "c.rs"]
    samples = training_samples(paths, files, EOS, seq_len=96, seed=0, fim_rate=0.5, tokens=tokens, table=table)
    assert samples.pieces > 3 and 0 < len(samples.records) < samples.pieces
    assert all(len(w) <= 96 for w in samples.whole)
    assert samples.counts()["fim"] + samples.counts()["left_to_right"] == samples.pieces
    # Every token of every file is in exactly one sample, and every file ends with EOS once (its last sample's).
    total = sum(map(len, samples.stream)) + sum(map(len, samples.whole))
    assert total == sum(map(len, files)) + 3 * len(samples.records) + len(samples.records) + sum(
        1 for i, p in enumerate(paths) if not samples.records or _last_piece_is_left_to_right(samples, p, files[i]))
    off = training_samples(paths, files, EOS, seq_len=96, seed=0)
    assert [s.tolist() for s in off.stream] == [f.tolist() + [EOS] for f in files] and not off.whole


def _last_piece_is_left_to_right(samples, path, ids) -> bool:
    return not any(r.path == path and r.end == len(ids) for r in samples.records)


def test_packing_keeps_whole_samples_in_one_window_and_restarts_positions():
    stream = [np.arange(100, 111, dtype=np.int32), np.arange(200, 205, dtype=np.int32)]  # 11 + 5 tokens
    whole = [np.arange(300, 306, dtype=np.int32), np.arange(400, 404, dtype=np.int32), np.arange(500, 507,
                                                                                                   dtype=np.int32)]
    windows = pack_samples(stream, whole, seq_len=8, pad_id=0)
    # next-fit: [300..305 | 100 101], [400..403 | 102..105], [500..506 | 106], then 107..110 200..204 (9): 2 windows
    assert windows.input_ids.tolist() == [
        [300, 301, 302, 303, 304, 305, 100, 101], [400, 401, 402, 403, 102, 103, 104, 105],
        [500, 501, 502, 503, 504, 505, 506, 106], [107, 108, 109, 110, 200, 201, 202, 203], [204, 0, 0, 0, 0, 0, 0, 0]]
    assert windows.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 0, 1, 2, 3],
        [0, 0, 0, 0, 0, 0, 0, 0]]
    assert windows.n_real.tolist() == [8, 8, 8, 8, 1]
    labels = window_labels(windows.input_ids, windows.position_ids, windows.n_real, "isolated")
    assert (labels[windows.position_ids == 0] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="longer than seq_len"):
        pack_samples([], [np.arange(9, dtype=np.int32)], seq_len=8, pad_id=0)


def test_when_the_stream_runs_out_a_window_of_whole_samples_ends_in_padding():
    windows = pack_samples([np.array([7, 7], dtype=np.int32)], [np.arange(1, 6, dtype=np.int32)] * 3, 8, pad_id=0)
    assert windows.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 7, 0], [1, 2, 3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]]
    assert windows.n_real.tolist() == [7, 5, 5]


def test_line_cut_style_follows_the_tokenizer(tiny):
    assert line_cut_style(tiny) == "before", "GPT-2's byte-level BPE merges a newline with the indentation after it"
    qwen = train_tokenizer([RUST_FILE, PY_FILE] * 4, vocab_size=512, split_pattern=QWEN2_SPLIT)
    pieces_ = qwen.convert_ids_to_tokens(qwen("f(y);\n    z", add_special_tokens=False)["input_ids"])
    assert any(a.endswith("Ċ") and b.startswith("Ġ") for a, b in zip(pieces_, pieces_[1:])), \
        f"Qwen's split keeps the newline apart from the next line's indentation: {pieces_}"
    assert line_cut_style(qwen) == "after"


@pytest.mark.parametrize("split", ["gpt2", "qwen"])
def test_line_and_block_middles_are_whole_lines_as_the_tokenizer_cuts_them(tiny, split):
    tokenizer = tiny if split == "gpt2" else train_tokenizer([RUST_FILE, PY_FILE] * 4, vocab_size=512,
                                                             split_pattern=QWEN2_SPLIT)
    table = NewlineTable.of(tokenizer)
    ids = np.array(tokenizer(PY_FILE, add_special_tokens=False)["input_ids"])
    lines, boundaries = table.line_starts(ids), table.boundaries(ids)
    assert set(lines) <= set(boundaries) and len(lines) > PY_FILE.count("\n") // 2

    def cuts(mix: MiddleMix | None) -> list[FimCut]:
        return [epoch_cut(0, "a.py", 0, len(ids), boundaries, 0.5, epoch, lines, *([mix] if mix else []))
                for epoch in range(600)]

    def middle(cut: FimCut) -> str:
        return tokenizer.decode(ids[cut.middle_start:cut.middle_end])

    one_line, blocks = cuts(MiddleMix(line_rate=1.0)), cuts(MiddleMix(block_rate=1.0, block_lines=4))
    # One line: its text and its break(s), where the tokenizer puts them ("before": starting the line, but the
    # file's first line has none before it).
    texts = [middle(c).strip("\n") for c in one_line]
    assert all("\n" not in t for t in texts) and {t.strip() for t in texts} >= {"import math", "total = sum(values)"}
    assert all(middle(c).endswith("\n") if table.style == "after" else middle(c).startswith("\n")
               for c in one_line if c.middle_start > 0)
    sizes = [sum(1 for line in middle(c).split("\n") if line.strip()) for c in blocks]  # blank lines aside
    assert max(sizes) == 4 and sum(2 <= n for n in sizes) > 0.7 * len(sizes), "blocks of 2 to 4 lines"
    # The mix draws each epoch's kind from one hash: a line where the line-only mix cuts one, a block likewise.
    mixed = cuts(MiddleMix(line_rate=0.5, block_rate=0.3, block_lines=4))
    assert abs(sum(a == b for a, b in zip(mixed, one_line)) - 300) < 4 * 13  # binomial 600 x 0.5, s.e. ~12
    assert abs(sum(a == b for a, b in zip(mixed, blocks)) - 180) < 4 * 12
    assert cuts(None) == [epoch_cut(0, "a.py", 0, len(ids), boundaries, 0.5, epoch) for epoch in range(600)], \
        "without a mix: uniform cuts, as they were"
    assert max(len(middle(c).split("\n")) for c in cuts(None)) > 6


def test_fim_samples_with_qwens_split_are_well_formed(fixture_repo, tmp_path):
    from codetune.commands.prepare import write_prepared

    bench = fim_check_module()
    directory = tmp_path / "qwen"
    train_tokenizer([RUST_FILE, PY_FILE] * 4, vocab_size=512, split_pattern=QWEN2_SPLIT).save_pretrained(directory)
    module = CodeDataModule(repo=str(fixture_repo), tokenizer=str(directory), seq_len=64, fim_rate=0.5, cache_dir=None)
    module.setup("fit")
    write_prepared(tmp_path / "prepared", module)
    check = bench.check_prepared(tmp_path / "prepared", fixture_repo, [".py", ".rs"])
    assert check.problems == [] and check.fim == len(module.fim_records) > 5


def test_prepared_windows_of_a_repository_decode_to_well_formed_samples(fixture_repo, tmp_path):
    bench = fim_check_module()
    out = tmp_path / "prepared"
    bench.prepare(fixture_repo, out, [".py", ".rs"], seq_len=64, fim_rate=0.5, spm_rate=0.5,
                  cache_dir=tmp_path / "cache")
    check = bench.check_prepared(out, fixture_repo, [".py", ".rs"])
    assert check.problems == [] and check.fim > 5 and check.spm > 0 and check.fim - check.spm > 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["phase_2_tokenize"]["fim"]["rate"] == 0.5 and report["phase_2_tokenize"]["fim"]["tokens"][
        "prefix"] == "<|fim_prefix|>"
    # The checker is not blind: a sample moved across a window boundary, or a swapped part, is caught.
    train = np.load(out / "train.npy")
    broken = train.copy()
    row, col = np.argwhere(train == check_tokens(out).middle)[0]
    broken[row, col] = broken[row, 0]
    np.save(out / "train.npy", broken)
    assert bench.check_prepared(out, fixture_repo, [".py", ".rs"]).problems


def check_tokens(out):
    from transformers import AutoTokenizer

    return find_fim_tokens(AutoTokenizer.from_pretrained(out))


def no_fim_tokenizer_dir(tmp_path) -> str:
    directory = tmp_path / "nofim"
    bpe([RUST_FILE, PY_FILE], ["<|endoftext|>"]).save_pretrained(directory)
    return str(directory)


def test_a_fim_rate_with_a_tokenizer_without_fim_tokens_is_one_clear_error(fixture_repo, tmp_path):
    module = CodeDataModule(repo=str(fixture_repo), tokenizer=no_fim_tokenizer_dir(tmp_path), seq_len=64,
                            fim_rate=0.5, cache_dir=None)
    with pytest.raises(ConfigError, match=r"--data\.fim_rate=0\.5: the tokenizer .* has no fill-in-the-middle "
                                          r"tokens \(looked for <\|fim_prefix\|> \(qwen\).*--data\.fim_rate 0"):
        module.setup("fit")


def test_the_default_with_a_tokenizer_without_fim_tokens_trains_left_to_right_and_says_so_once(fixture_repo, tmp_path):
    module = CodeDataModule(repo=str(fixture_repo), tokenizer=no_fim_tokenizer_dir(tmp_path), seq_len=64,
                            cache_dir=None)
    with pytest.warns(UserWarning, match="trains left-to-right only") as caught:
        module.setup("fit")
    assert sum("fill-in-the-middle" in str(w.message) for w in caught) == 1
    assert module.fim_rate == 0 and module.fim_records == [] and module.report["phase_2_tokenize"]["fim"]["fim"] == 0
    silent = CodeDataModule(repo=str(fixture_repo), tokenizer=no_fim_tokenizer_dir(tmp_path), seq_len=64,
                            fim_rate=0.0, cache_dir=None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silent.setup("fit")


def test_the_default_trains_fim_with_fim_tokens_and_validation_stays_left_to_right(fixture_repo):
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, cache_dir=None)
    module.setup("fit")
    fim = module.report["phase_2_tokenize"]["fim"]
    assert module.fim_rate == 0.5 and fim["fim"] == len(module.fim_records) > 0
    assert fim["psm"] + fim["spm"] == fim["fim"] and fim["fim"] + fim["left_to_right"] == fim["pieces"]
    prefix = module.fim_tokens.prefix
    assert (module.train_windows.input_ids == prefix).sum() == fim["fim"]
    assert not (module.val_windows.input_ids == prefix).any()


def test_the_middle_mix_reaches_every_epochs_windows_and_the_manifest(fixture_repo):
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, fim_rate=1.0, fim_spm_rate=0.0, fim_line_rate=1.0,
                            fim_block_rate=0.0, cache_dir=None)
    module.setup("fit")
    assert module.report["phase_2_tokenize"]["fim"]["middles"] == {"line_rate": 1.0, "block_rate": 0.0,
                                                                  "block_lines": 8}
    tokens, eos = module.fim_tokens, module.tokenizer.eos_token_id
    for epoch in (0, 1):
        middles = []
        for row in module.fim_epochs.input_ids(epoch).tolist():
            starts = [i + 1 for i, t in enumerate(row) if t == tokens.middle]
            middles += [module.tokenizer.decode(row[i:row.index(eos, i)]) for i in starts]
        assert len(middles) == len(module.fim_records) > 10
        lines = [sum(1 for line in m.split("\n") if line.strip()) for m in middles]  # blank lines aside
        assert max(lines) == 1 and sum(lines) > len(middles) // 2


def test_file_headers_start_every_sample_with_the_repository_header(fixture_repo):
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, file_headers=True, fim_rate=1.0, cache_dir=None)
    module.setup("fit")
    tokens, windows = module.fim_tokens, module.train_windows
    spans = []  # every sample (or window-gap fragment) of every window: from one position 0 to the next
    for row, positions, n in zip(windows.input_ids, windows.position_ids, windows.n_real):
        starts = [int(c) for c in np.flatnonzero(positions[:n] == 0)] + [int(n)]
        spans += [row[a:b] for a, b in zip(starts, starts[1:])]
    fim_spans = [ids for ids in spans if tokens.prefix in ids]
    assert len(fim_spans) == len(module.fim_records) > 0
    paths = set(module.split_files["train"])
    for ids in fim_spans:
        assert ids[0] == tokens.file_sep
        header = module.tokenizer.decode(ids[1:list(ids).index(tokens.prefix)])
        assert header.endswith("\n") and header[:-1] in paths
    val = module.tokenizer.decode(module.val_windows.input_ids[0][:module.val_windows.n_real[0]])
    assert val.startswith("<|file_sep|>" + module.split_files["val"][0] + "\n")


def test_every_epoch_redraws_the_cuts_in_place_and_keeps_the_layout(fixture_repo):
    from codetune.data.packing import whole_placements

    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, fim_rate=0.5, cache_dir=None)
    module.setup("fit")
    epochs, tokens, eos = module.fim_epochs, module.fim_tokens, module.tokenizer.eos_token_id
    assert epochs.input_ids(0) is module.train_windows.input_ids, "epoch 0 is the windows as packed"
    inside = np.zeros(module.train_windows.input_ids.shape, dtype=bool)
    cuts = {}
    for epoch in range(4):
        rows = epochs.input_ids(epoch)
        for (window, column), piece in zip(epochs.placements, epochs.pieces):
            span = rows[window, column:column + len(piece.ids) + 4].tolist()
            inside[window, column:column + len(span)] = True
            pre, suf, mid = span.index(tokens.prefix), span.index(tokens.suffix), span.index(tokens.middle)
            assert span[-1] == eos and pre < suf < mid
            rebuilt = span[pre + 1:suf] + span[mid + 1:-1] + span[suf + 1:mid]  # P + M + S (SPM: "" + PM + S)
            assert rebuilt == piece.ids.tolist(), "every epoch's sample holds its piece, cut at its boundaries"
            cuts.setdefault((piece.path, piece.piece), set()).add(tuple(span))
        assert (rows[~inside] == module.train_windows.input_ids[~inside]).all(), "only FIM samples change"
    redrawn = sum(len(samples) > 1 for samples in cuts.values())
    assert redrawn >= 0.6 * len(cuts), f"only {redrawn} of {len(cuts)} FIM samples were cut anew"
    assert whole_placements([3, 4, 2, 5], 8) == [(0, 0), (0, 3), (1, 0), (1, 2)]


def test_the_training_loader_serves_each_epochs_cuts_and_resumes_them(fixture_repo):
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, batch_size=2, gradient_accumulation_steps=1,
                            fim_rate=0.5, cache_dir=None)
    module.setup("fit")
    loader = module.train_dataloader()
    loader.sampler.set_epoch(2)
    batches = [(b["sample_ids"].tolist(), b["input_ids"]) for b in loader]
    rows = module.fim_epochs.input_ids(2)
    assert all((ids == torch_rows(rows, sample_ids)).all() for sample_ids, ids in batches)
    assert any((ids != torch_rows(module.train_windows.input_ids, s)).any() for s, ids in batches), \
        "epoch 2 is not epoch 0"
    module.load_state_dict({"epoch": 2, "steps_done": 3, "train_windows": len(module.train_windows),
                            "optimizer_batch_size": 2, "world_size": 1, "fim_samples": len(module.fim_records)})
    resumed = [b["input_ids"] for b in module.train_dataloader()]
    assert len(resumed) == len(batches) - 3 and all((a == b).all() for a, (_, b) in zip(resumed, batches[3:]))


def torch_rows(rows, sample_ids):
    import torch

    return torch.from_numpy(rows[np.asarray(sample_ids)].astype(np.int64))


def test_the_newline_table_is_kept_in_the_tokenizers_cache_directory(tiny, tmp_path):
    from codetune.data.fim import NEWLINE_TABLE

    fresh = NewlineTable.of(tiny)
    written = NewlineTable.of(tiny, tmp_path)
    assert (tmp_path / NEWLINE_TABLE).is_file()
    read = NewlineTable.of(tiny, tmp_path)
    assert (read.starts == fresh.starts).all() and (read.ends == fresh.ends).all() and (written.ends == fresh.ends).all()
    # A table of another size (another tokenizer's, or a cut file) is a miss, recomputed and rewritten.
    np.save(tmp_path / NEWLINE_TABLE, np.zeros((2, 7), dtype=bool))
    assert (NewlineTable.of(tiny, tmp_path).ends == fresh.ends).all()
    (tmp_path / NEWLINE_TABLE).write_bytes(b"\x93NUMPY")
    assert (NewlineTable.of(tiny, tmp_path).starts == fresh.starts).all()
    assert np.load(tmp_path / NEWLINE_TABLE).shape == (2, len(tiny))
