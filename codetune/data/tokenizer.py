"""The embedded default model's tokenizer: a byte-level BPE trained offline, with Qwen2.5-Coder's sentinels.

`--model.name_or_path tiny` needs no download. The tokenizer is trained with `tokenizers` on the run's
*training* files (never the validation ones, so held-out metrics stay honest) and saved with the model in
Hugging Face format into the run directory (`base_model/`).

It is trained once per run directory, by rank zero (every rank gets that one), at the run's first fit. From
then on `base_model/` holds it and every later fit of that directory (a resume) loads it instead of training
a new one: the embeddings and the adapter learned what its ids mean, and a repository that changed since
would train another vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from codetune.data.model_source import CONFIG_FILE
from codetune.storage import BASE_MODEL_DIR

if TYPE_CHECKING:  # imported where used: tokenizers and transformers take a moment to import
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

TINY_NAME = "tiny"
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
# Qwen2.5-Coder's fill-in-the-middle and repository sentinels: the demo and the tests train and infill through
# the same path as a real code model (codetune.data.fim finds them by name).
FIM_SPECIAL_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                      "<|file_sep|>")


# Qwen2's pre-tokenizer pattern (its tokenizer.json): a line break after punctuation joins it, a run of line
# breaks stands alone, so tokens break after a newline rather than merging it with the next indentation.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048,
                    split_pattern: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`; every byte is in the alphabet, so no input is ever unknown.

    `split_pattern` (e.g. `QWEN2_SPLIT`) pre-splits the text as that model family's tokenizer does, so tests and
    benchmarks can see how a real code model's tokens break around line breaks offline; None: GPT-2's split.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split_pattern is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *FIM_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tiny_tokenizer(tokenizer)


def tiny_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A tokenizer that `train_tokenizer` trained (in `tokenizers`' form: read back from its JSON, say) as the
    transformers tokenizer `train_tokenizer` returns, with the same special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(FIM_SPECIAL_TOKENS))


def tiny_tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """The tokenizer `train_tokenizer` returned, from its serialisation (`backend_tokenizer.to_str()`)."""
    from tokenizers import Tokenizer

    return tiny_tokenizer(Tokenizer.from_str(text))


def saved_tiny_base(run_dir: Path) -> Path | None:
    """The run directory's `base_model/` once a fit of it saved the tiny model there (whole: it is written
    atomically), else None."""
    base = Path(run_dir) / BASE_MODEL_DIR
    return base if (base / CONFIG_FILE).is_file() else None
