"""Rebuild codetune's embedded model from nothing: corpus, tokenizer, pretraining, 16-bit export, model card.

Run from the repository root, after installing the Debian packages its corpus comes from (`make
embedded-model` does both)::

    python bench/embedded_model.py                      # every phase; each skips what its output already holds
    python bench/embedded_model.py --max-steps 2000     # pretrain further (before its decay began: see pretrain.py)
    python bench/embedded_model.py --phase card         # only re-measure the model card's figures

Phases, each resumable (a pretraining run outlives a working session: run the command again):

1. **corpus** (`bench/embedded/corpus.py`): permissive Rust crates and Python packages, never tokio, requests
   or codetune, copied to WORK/corpus with `corpus.json`.
2. **tokenizer**: a byte-level BPE of 8,192 entries trained on the corpus with Qwen2's pre-tokenizer split and
   Qwen2.5-Coder's FIM and repository tokens by name (`codetune.data.tokenizer.train_tokenizer`).
3. **pretrain** (`bench/embedded/pretrain.py`): a 4-layer, 256-wide Llama, every weight, on the windows a
   codetune fit trains on (512 tokens, half FIM, file headers), 16 windows a step, checkpointed every 50 steps.
4. **export**: 16-bit safetensors with the tokenizer into `codetune/embedded/`.
5. **card**: the model's figures on tokio and requests (`bench/embedded/card.py`) and the model card,
   `codetune/embedded/README.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedded.card import reserved_figures  # noqa: E402
from embedded.corpus import build_corpus  # noqa: E402
from embedded.model_card import write_card  # noqa: E402
from embedded.pretrain import export_model, pretrain  # noqa: E402

from codetune.data.fim import MiddleMix  # noqa: E402
from codetune.storage import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "codetune" / "embedded"
PHASES = ("corpus", "tokenizer", "pretrain", "export", "card")
VOCAB = 8192


def train_corpus_tokenizer(corpus: Path, out: Path) -> None:
    from codetune.data.tokenizer import QWEN2_SPLIT, train_tokenizer

    files = sorted(p for p in corpus.rglob("*") if p.suffix in (".rs", ".py"))
    tokenizer = train_tokenizer((p.read_text(errors="replace") for p in files), vocab_size=VOCAB,
                                split_pattern=QWEN2_SPLIT)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("~/.cache/codetune/embedded-build").expanduser(),
                        help="Where the corpus, tokenizer and checkpoints live (default: %(default)s).")
    parser.add_argument("--max-steps", type=int, default=1100, help="Pretraining steps of 16 x 512 tokens.")
    parser.add_argument("--fim-spm-rate", type=float, default=0.5,
                        help="Share of the FIM samples in SPM order in this pretraining session (default: %(default)s).")
    parser.add_argument("--fim-line-rate", type=float, default=0.0,
                        help="Share of the FIM samples whose middle is one line (default: %(default)s: uniform cuts).")
    parser.add_argument("--fim-block-rate", type=float, default=0.0,
                        help="Share of the FIM samples whose middle is a block of 2 to 8 lines (default: %(default)s).")
    parser.add_argument("--phase", choices=PHASES, help="Run only this phase (default: all, skipping done ones).")
    args = parser.parse_args(argv)
    work = args.work
    todo = [args.phase] if args.phase else list(PHASES)
    if "corpus" in todo and (args.phase or not (work / "corpus" / "corpus.json").is_file()):
        build_corpus(work / "corpus")
    if "tokenizer" in todo and (args.phase or not (work / "model" / "tokenizer.json").is_file()):
        train_corpus_tokenizer(work / "corpus", work / "model")
    if "pretrain" in todo:
        # Every session's wall time goes to sessions.json, which the card sums.
        pretrain(work / "corpus", work / "model", work / "train", max_steps=args.max_steps,
                 sessions=work / "sessions.json", fim_spm_rate=args.fim_spm_rate,
                 middles=MiddleMix(args.fim_line_rate, args.fim_block_rate))
    if "export" in todo:
        export_model(work / "train" / "checkpoints" / "last.ckpt", work / "model", EMBEDDED)
    if "card" in todo:
        figures = reserved_figures()
        atomic_write_text(work / "figures.json", json.dumps(figures, indent=1))
        write_card(EMBEDDED / "README.md", work, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
