"""Are the FIM samples of a real repository well formed? `codetune prepare` it, decode its windows, and check.

Run from the repository root::

    python bench/fim_samples.py                                     # serde_json from Debian's crates
    python bench/fim_samples.py REPO --extensions .py --seq-len 1024 --fim-rate 0.5 --spm-rate 0.5

It runs `codetune prepare` (the 'tiny' tokenizer, which has Qwen's FIM sentinels, trained on the
repository, or `--model DIR`'s; `--data.fim_rate`, `--data.fim_spm_rate`, `--data.seq_len` as given) into a temporary
directory, then reads `train.npy` back, without the data module, and checks every FIM sample:

* **well formed**: from each ``<|fim_prefix|>`` on, in the same row, one ``<|fim_suffix|>`` (right
  after the prefix sentinel in SPM), one ``<|fim_middle|>`` and an EOS, in that order, and no other
  sentinel between: a sample cut by a window's end would lack its middle sentinel or its EOS;
* **the parts concatenate back to the piece**: prefix, middle and suffix (SPM: the run after the
  middle sentinel is prefix + middle) are, id for id, the piece of the file's own tokenization that
  `data_report.json`'s ``fim_samples`` names, in packing order, and their decoded texts put together
  are the piece's text; the pieces of a file join to its text;
* **rates**: FIM samples / pieces and SPM / FIM against the asked rates, with the binomial standard
  error (a rate more than 4 standard errors off fails);
* **separate tokenization**: the share of samples whose prefix, middle and suffix, each tokenized on
  its own (as an editor's prefix and suffix are), give the ids of the slices (see `codetune.data.fim`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codetune.data.files import scan_repository  # noqa: E402
from codetune.data.fim import FimTokens, find_fim_tokens  # noqa: E402

SERDE_JSON = "/usr/share/cargo/registry"
MAX_SIGMAS = 4.0


@dataclass
class FimCheck:
    """What decoding a prepared directory's training windows found."""

    pieces: int = 0
    fim: int = 0
    spm: int = 0
    windows: int = 0
    problems: list[str] = field(default_factory=list)
    retokenized_equal: int = 0

    def rate_problems(self, fim_rate: float, spm_rate: float) -> list[str]:
        """Rates more than MAX_SIGMAS binomial standard errors from the asked ones."""
        out = []
        for name, hits, n, asked in (("fim", self.fim, self.pieces, fim_rate), ("spm", self.spm, self.fim, spm_rate)):
            if n and abs(hits / n - asked) > MAX_SIGMAS * standard_error(asked, n):
                out.append(f"{name} rate {hits / n:.3f} is off {asked} by more than {MAX_SIGMAS} standard errors")
        return out


def standard_error(rate: float, n: int) -> float:
    return math.sqrt(rate * (1 - rate) / n) if n else float("inf")


def fim_spans(row: np.ndarray, tokens: FimTokens, eos_id: int) -> list[tuple[int, int, int, int] | str]:
    """(prefix, suffix, middle, eos) sentinel positions of every sample in a window row, or a problem string."""
    sentinels = {tokens.prefix, tokens.suffix, tokens.middle}
    out: list[tuple[int, int, int, int] | str] = []
    for start in np.flatnonzero(row == tokens.prefix):
        found, i = [int(start)], int(start) + 1
        for want in (tokens.suffix, tokens.middle, eos_id):
            while i < len(row) and row[i] != want and not (row[i] in sentinels and want != eos_id):
                i += 1
            if i == len(row) or row[i] != want:
                break
            found.append(i)
            i += 1
        out.append(tuple(found) if len(found) == 4 else f"sample at column {start} is cut or out of order")
    return out


def check_prepared(out: Path, repo: Path, extensions: list[str]) -> FimCheck:
    """Check `codetune prepare`'s output directory `out` of `repo` (see the module docstring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = find_fim_tokens(tokenizer)
    report = json.loads((out / "data_report.json").read_text())
    train = np.load(out / "train.npy")
    texts = {f.rel_path: f.text for f in scan_repository(repo, extensions).files}
    ids_of = {}
    records = report["fim_samples"]
    fim = report["phase_2_tokenize"]["fim"]
    check = FimCheck(pieces=fim["pieces"], fim=fim["fim"], spm=fim["spm"], windows=len(train))
    spans = [(row, span) for row in train for span in fim_spans(row, tokens, tokenizer.eos_token_id)]
    if len(spans) != len(records):
        check.problems.append(f"{len(spans)} FIM samples in the windows, {len(records)} in data_report.json")
    for (row, span), record in zip(spans, records):
        if isinstance(span, str):
            check.problems.append(f"{record['path']} piece {record['piece']}: {span}")
            continue
        path = record["path"]
        if path not in ids_of:
            ids_of[path] = np.array(tokenizer(texts[path], add_special_tokens=False)["input_ids"])
        _check_sample(check, tokenizer, row, span, record, ids_of[path])
    return check


def _check_sample(check: FimCheck, tokenizer, row: np.ndarray, span: tuple[int, int, int, int], record: dict,
                  file_ids: np.ndarray) -> None:
    pre, suf, mid, eos = span
    before, between, after = row[pre + 1:suf], row[suf + 1:mid], row[mid + 1:eos]
    start, end = record["tokens"]
    a, b = record["middle"]
    piece = file_ids[start:end]
    where = f"{record['path']} piece {record['piece']}"
    if record["order"] == "spm" and len(before):
        check.problems.append(f"{where}: SPM sample has ids between its prefix and suffix sentinels")
    prefix, middle, suffix = piece[:a], piece[a:b], piece[b:]
    if not np.array_equal(np.concatenate((before, after, between)), piece):
        check.problems.append(f"{where}: prefix + middle + suffix are not the piece's ids")
    elif not np.array_equal(between, suffix) or not np.array_equal(np.concatenate((before, after)),
                                                                   np.concatenate((prefix, middle))):
        check.problems.append(f"{where}: the cut is not the one data_report.json records")
    texts = [tokenizer.decode(x) for x in (prefix, middle, suffix)]
    if "".join(texts) != tokenizer.decode(piece):
        check.problems.append(f"{where}: the decoded parts do not join to the piece's text")
    retokenized = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    check.retokenized_equal += all(list(map(int, x)) == r for x, r in zip((prefix, middle, suffix), retokenized))


def prepare(repo: Path, out: Path, extensions: list[str], seq_len: int, fim_rate: float, spm_rate: float,
            cache_dir: Path, model: str = "tiny") -> None:
    from codetune.commands.prepare import main as prepare_main

    prepare_main(["--model.name_or_path", model, "--data.repo", str(repo), "--data.extensions", json.dumps(extensions),
                  "--data.seq_len", str(seq_len), "--data.fim_rate", str(fim_rate), "--data.fim_spm_rate", str(spm_rate),
                  "--data.cache_dir", str(cache_dir), "--out", str(out)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", nargs="?", default=None, help="Repository (default: serde_json from Debian's crates).")
    parser.add_argument("--extensions", nargs="+", default=[".rs"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--fim-rate", type=float, default=0.5)
    parser.add_argument("--spm-rate", type=float, default=0.5)
    parser.add_argument("--model", default="tiny", help="--model.name_or_path: whose tokenizer (a local model dir)")
    parser.add_argument("--split", choices=("gpt2", "qwen2"), default="gpt2",
                        help="with the tiny model: pre-split as GPT-2's byte-level BPE (its default) or as Qwen2's "
                             "tokenizer does (codetune.model.tiny.QWEN2_SPLIT: tokens break after a newline)")
    args = parser.parse_args()
    repo = Path(args.repo) if args.repo else _serde_json()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        model = qwen2_split_model(repo, args.extensions, Path(tmp) / "model") if args.split == "qwen2" else args.model
        prepare(repo, out, args.extensions, args.seq_len, args.fim_rate, args.spm_rate, Path(tmp) / "cache", model)
        check = check_prepared(out, repo, args.extensions)
    problems = check.problems + check.rate_problems(args.fim_rate, args.spm_rate)
    print(f"repo: {repo} ({', '.join(args.extensions)}), seq_len {args.seq_len}, {check.windows} training windows")
    print(f"pieces {check.pieces:,}; FIM {check.fim:,} = {check.fim / max(check.pieces, 1):.3f} "
          f"(asked {args.fim_rate}, standard error {standard_error(args.fim_rate, check.pieces):.3f}); "
          f"SPM {check.spm:,} = {check.spm / max(check.fim, 1):.3f} of FIM "
          f"(asked {args.spm_rate}, standard error {standard_error(args.spm_rate, check.fim):.3f})")
    print(f"well formed and rebuilding their piece: {check.fim - len(check.problems)} of {check.fim}; "
          f"parts tokenized alone give the same ids: {check.retokenized_equal} of {check.fim}")
    for problem in problems[:20]:
        print("PROBLEM:", problem)
    print("verdict:", "PASS" if not problems else f"FAIL ({len(problems)} problems)")
    return 0 if not problems else 1


def qwen2_split_model(repo: Path, extensions: list[str], directory: Path) -> str:
    """A model directory (a tiny config, no weights: prepare reads only the config) whose tokenizer is the tiny BPE
    trained on `repo` with Qwen2's pre-split, for how a Qwen tokenizer's tokens break around line breaks."""
    from codetune.data.tokenizer import QWEN2_SPLIT, train_tokenizer
    from codetune.model.tiny import padded_vocab_size, tiny_config

    tokenizer = train_tokenizer([f.text for f in scan_repository(repo, extensions).files], split_pattern=QWEN2_SPLIT)
    tokenizer.save_pretrained(directory)
    tiny_config(padded_vocab_size(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).save_pretrained(directory)
    return str(directory)


def _serde_json() -> Path:
    found = sorted(Path(SERDE_JSON).glob("serde_json-*"))
    if not found:
        raise SystemExit(f"no serde_json under {SERDE_JSON}: apt-get install librust-serde-json-dev, or give REPO")
    return found[-1]


if __name__ == "__main__":
    raise SystemExit(main())
