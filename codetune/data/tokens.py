"""Tokenizers: which one a run uses, and turning file texts into token ids with every core, cached on disk.

**Cache.** Token ids of each text are stored in one file under
``<cache_dir>/tokens/v1-<tokenizer fingerprint>/<key[:2]>/<key>.i32`` (raw little-endian int32):

* the *tokenizer fingerprint* hashes the tokenizer's full serialisation (vocabulary, merges,
  normaliser, pre-tokeniser, added tokens), so another tokenizer, or another version of the same one,
  never reads these ids: it has a directory of its own;
* the *key* hashes the exact text that is tokenized, after decoding, CRLF normalisation and secret
  redaction. Every ingestion setting that changes what is tokenized changes the text and so the key;
  settings that only choose *which* files are kept (extensions, ignore patterns, size caps) need no
  part in it. An unchanged file is never re-tokenized; a changed file misses and only it is encoded.

A stale entry cannot be read: a key names its content. Files are written atomically (temporary file
then ``os.replace``), so an interrupted run leaves whole entries or none; an entry whose size is not a
multiple of 4 bytes is treated as a miss and rewritten. Nothing is ever evicted: delete the directory
to reclaim the space (the manifest's ``phase_2_tokenize.cache_dir`` gives its path). The same
directory holds the tokenizer's line-break table for fill-in-the-middle cuts, ``newlines.npy``
(`codetune.data.fim.NewlineTable`), which depends on the tokenizer alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from codetune.errors import ConfigError
from codetune.data.model_source import (TOKENIZER_FILE, bad_model_dir_message, check_model_source, local_model_dir,
                                        tokenizer_problem)
from codetune.data.tokenizer import TINY_NAME, tiny_tokenizer, train_tokenizer
from codetune.storage import atomic_write_bytes

if TYPE_CHECKING:  # imported where used: transformers' tokenizer classes are slow to import
    from transformers import PreTrainedTokenizerBase

CACHE_FORMAT = "v1"
TOKEN_DTYPE = np.dtype("<i4")


def load_tokenizer(name_or_path: str, training_texts: Sequence[str], trust_remote_code: bool = False,
                   tiny_vocab_size: int = 2048, flag: str = "--model.name_or_path",
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path` (hub id at `revision`, or local dir), or a new one trained for `tiny`;
    errors name `flag`."""
    from transformers import AutoTokenizer

    if name_or_path == TINY_NAME:
        return train_tokenizer(training_texts, vocab_size=tiny_vocab_size)
    check_model_source(name_or_path, flag, tokenizer_only=True)
    directory = local_model_dir(name_or_path)
    try:
        # The expanded directory: transformers takes an unexpanded '~/...' for a hub id.
        tokenizer = AutoTokenizer.from_pretrained(str(directory or name_or_path), trust_remote_code=trust_remote_code,
                                                  revision=revision)
    except (ValueError, KeyError) as err:  # what transformers raises on a tokenizer.json it cannot read, or lacks
        problem = _tokenizer_file_problem(directory, err) if directory is not None else None
        if problem is None:
            raise
        raise ConfigError(bad_model_dir_message(flag, directory, problem)) from err
    except OSError as err:
        if directory is not None:
            raise ConfigError(bad_model_dir_message(
                flag, directory, f"no tokenizer could be loaded from it ({str(err).strip().rstrip('.')})")) from err
        raise ConfigError(
            f"{flag} {name_or_path!r}: no tokenizer could be loaded ({str(err).strip().rstrip('.')}). "
            f"Use a local model directory, a Hugging Face id that is cached or reachable (with HF_HUB_OFFLINE "
            f"unset), or 'embedded' for the offline default."
        ) from err
    if not tokenizer.is_fast:
        raise ConfigError(f"{flag} {name_or_path!r} has no fast tokenizer; codetune needs one "
                          f"(tokenizer.json) to tokenize repositories in parallel.")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{flag} {name_or_path!r}: its tokenizer has no EOS token, which "
                          f"codetune needs to separate files.")
    return tokenizer


def _tokenizer_file_problem(directory: Path, err: Exception) -> str | None:
    """Why transformers failed with `err` on `directory`'s tokenizer: its tokenizer.json is missing (transformers then
    tries to build one from other files, e.g. by converting a sentencepiece model) or does not parse; None when the
    file parses, so the error is another one."""
    if not (directory / TOKENIZER_FILE).is_file():
        reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__  # one line, whatever transformers wrote
        return f"it has no {TOKENIZER_FILE}, and transformers could not build a tokenizer without it ({reason})"
    return tokenizer_problem(directory)


def load_saved_tiny_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """The 'tiny' tokenizer a run saved with its model in `base_dir` (`codetune.model.tiny`), as it was trained.
    One that is missing or does not parse is refused: training another would change what the ids mean."""
    from tokenizers import Tokenizer

    path = base_dir / TOKENIZER_FILE
    problem = f"it has no {TOKENIZER_FILE}" if not path.is_file() else tokenizer_problem(base_dir)
    if problem:
        raise ConfigError(
            f"--model.name_or_path tiny: {base_dir} holds the tiny model this run directory was started with, but "
            f"{problem}. A new tokenizer is not trained in its place: the model and its checkpoints learned what "
            f"the saved one's token ids mean. Restore {base_dir} as the run saved it, or start a new run (another "
            f"--run_name).")
    return tiny_tokenizer(Tokenizer.from_file(str(path)))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id; models without one pad with EOS (padding is never a target, see packing)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids per text, no special tokens; the Rust backend spreads the batch over all cores."""
    if not texts:
        return []
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of everything that decides the tokenizer's output."""
    return _digest(tokenizer.backend_tokenizer.to_str().encode("utf-8"))


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id map (added tokens included): what the rows of the embeddings mean."""
    return _digest(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))


def text_key(text: str) -> str:
    # surrogatepass: a text decoded with surrogateescape still hashes instead of raising.
    return _digest(text.encode("utf-8", errors="surrogatepass"))


@dataclass(frozen=True)
class CacheStats:
    """What one cached tokenization did: texts found in the cache and texts encoded."""

    hits: int
    misses: int
    directory: str | None


class TokenCache:
    """Token ids on disk for one tokenizer; see the module docstring for the layout and the keys."""

    def __init__(self, cache_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
        self.directory = Path(cache_dir).expanduser() / "tokens" / f"{CACHE_FORMAT}-{tokenizer_fingerprint(tokenizer)}"
        self.tokenizer = tokenizer

    def path(self, key: str) -> Path:
        # Two hex digits of fan-out keep directories small on large repositories.
        return self.directory / key[:2] / f"{key}.i32"

    def read(self, key: str) -> np.ndarray | None:
        try:
            raw = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) % TOKEN_DTYPE.itemsize:
            return None  # not written by `write` (which is atomic): re-tokenize and overwrite it
        return np.frombuffer(raw, dtype=TOKEN_DTYPE).astype(np.int32)

    def write(self, key: str, ids: np.ndarray) -> None:
        atomic_write_bytes(self.path(key), np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())

    def tokenize(self, texts: Sequence[str]) -> tuple[list[np.ndarray], CacheStats]:
        """Token ids of `texts` (as `tokenize_texts`), reading hits and encoding only the misses."""
        keys = [text_key(t) for t in texts]
        ids: list[np.ndarray | None] = [self.read(k) for k in keys]
        missing = [i for i, found in enumerate(ids) if found is None]
        for i, encoded in zip(missing, tokenize_texts(self.tokenizer, [texts[i] for i in missing])):
            self.write(keys[i], encoded)
            ids[i] = encoded
        return ids, CacheStats(len(texts) - len(missing), len(missing), str(self.directory))


def tokenize_cached(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                    cache_dir: str | Path | None) -> tuple[list[np.ndarray], CacheStats]:
    """`tokenize_texts` through a `TokenCache` in `cache_dir`, or without a cache when it is None."""
    if cache_dir is None:
        return tokenize_texts(tokenizer, texts), CacheStats(0, len(texts), None)
    return TokenCache(cache_dir, tokenizer).tokenize(texts)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
