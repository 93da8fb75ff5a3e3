"""The check's setup, outside the budget: the randomly initialised model of the mode's shapes with a tokenizer
trained on the corpus, saved for `from_pretrained`; the corpus copied as often as the longest run needs; the CUDA
context this process holds. Also the setup row that checks every trained token id against the vocabulary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The throughput bench's corpus writer: bench/ is on sys.path, as it is for this package (gpu_check.py puts it there).
from train_throughput import write_corpus

from codetune.memory.units import GiB

from .fits import Context
from .row import FAIL, PASS, Row
from .settings import CORPUS_MARGIN, EFFECTIVE_BATCH, MODEL_CONFIG_FILE, Mode


def corpus_texts(roots: Sequence[Path]) -> dict[str, str]:
    from codetune.data.files import source_texts

    texts = source_texts(roots)
    if not texts:
        raise SystemExit(f"no source files under {[str(r) for r in roots]}; pass --corpus DIR")
    return texts


def tokens_needed(mode: Mode) -> int:
    """Tokens the longest run trains (with CORPUS_MARGIN): one epoch must hold all its steps."""
    windows = EFFECTIVE_BATCH * max(mode.train_steps, mode.oom_steps, mode.precision_steps)
    return int(CORPUS_MARGIN * windows * (mode.seq_len or 4096))


def build_model_dir(mode: Mode, texts: Sequence[str], directory: Path) -> dict[str, Any]:
    """The randomly initialised Qwen2 of `mode` and a tokenizer trained on `texts`, saved for `from_pretrained`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from codetune.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=mode.tokenizer_vocab)
    # The tokenizer's special ids (a hub config names Qwen's own, which this tokenizer does not have).
    config = Qwen2Config.from_dict({**mode.model_config, "bos_token_id": tokenizer.bos_token_id,
                                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"tokenizer of {len(tokenizer)} tokens does not fit the model's vocabulary "
                         f"({config.vocab_size})")
    with torch.device(mode.device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32 if mode.dry_run else torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if not mode.dry_run:
        torch.cuda.empty_cache()  # the fp32 init's blocks: the caps below count reserved memory
    return {"parameters": parameters, "tokenizer_tokens": len(tokenizer), "vocab_size": config.vocab_size,
            "config_source": str(MODEL_CONFIG_FILE) if MODEL_CONFIG_FILE.is_file() and not mode.dry_run else "code"}


def cuda_context_bytes() -> int:
    """Device memory in use before torch allocates anything: this process's CUDA context (and other processes)."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # creates the context and loads the first kernels
    free, total = torch.cuda.mem_get_info(0)
    return total - free - torch.cuda.memory_reserved(0)


def setup(mode: Mode, work: Path, corpus_roots: Sequence[Path]) -> tuple[Context, Row]:
    from codetune.memory.allocator import allocator_record

    started = time.perf_counter()
    context = cuda_context_bytes() if not mode.dry_run else 0
    texts = corpus_texts(corpus_roots)
    model_dir = work / "model"
    model = build_model_dir(mode, list(texts.values()), model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus_tokens = sum(len(ids) + 1 for ids in tokenizer(list(texts.values()))["input_ids"])
    copies = max(1, -(-tokens_needed(mode) // corpus_tokens))
    write_corpus(texts, copies, work / "corpus")
    ctx = Context(mode=mode, work=work, model_dir=model_dir, corpus=work / "corpus", context_bytes=context)
    device = torch.cuda.get_device_name(0) if not mode.dry_run else "cpu"
    figures = {**model, "corpus_files": len(texts), "corpus_tokens": corpus_tokens, "corpus_copies": copies,
               "device": device, "cuda_context_gib": context / GiB, "card_gib": mode.card_gib,
               "allocator_cap_gib": ctx.card_cap_bytes / GiB if not mode.dry_run else None,
               "torch": torch.__version__, "cuda_allocator": allocator_record(),
               "setup_s": time.perf_counter() - started}
    shape = mode.model_config
    measured = (f"Qwen2 {shape['num_hidden_layers']} x {shape['hidden_size']} ({model['parameters'] / 1e6:,.1f}M, "
                f"vocab {model['vocab_size']:,}, tokenizer {model['tokenizer_tokens']:,}); corpus {len(texts)} files "
                f"x {copies}, {corpus_tokens:,} tokens; {device}")
    if not mode.dry_run:
        measured += (f"; card {mode.card_gib:g} GiB = context {context / GiB:.2f} + allocator cap "
                     f"{ctx.card_cap_bytes / GiB:.2f}")
    return ctx, Row("setup", "random model, tokenizer, corpus", PASS, measured,
                    "tokenizer fits the vocabulary", figures)


def vocabulary_row(ctx: Context) -> Row | None:
    """Whether every token id the runs trained on is below the model's vocabulary (none is cut or remapped)."""
    ids = [r.max_token_id for r in ctx.runs.values() if r.max_token_id is not None]
    if not ids:
        return None
    vocab = ctx.mode.model_config["vocab_size"]
    return Row("setup", "token ids < model vocabulary", PASS if max(ids) < vocab else FAIL,
               f"max id in the packed windows {max(ids):,} < {vocab:,}", "every id < vocab_size",
               {"max_token_id": max(ids), "vocab_size": vocab})
