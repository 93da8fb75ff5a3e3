"""What is wrong with a local model directory, said before transformers fails on it with its own traceback.

transformers reports a broken directory by what it happened to trip over: a directory without `config.json` is
"Unrecognized model ... should have a `model_type` key" (a ValueError), an unparseable `tokenizer.json` a bare
JSONDecodeError or KeyError. These checks name the file and what is wrong with it, so the error can say the fix.
They are cheap: `config.json` is read before loading (a few KB); `tokenizer.json` is parsed only after a load
failed, to find out whether it was the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


def local_model_dir(name_or_path: str | Path) -> Path | None:
    """The directory `name_or_path` names, or None for a hub id (or anything that is not a directory)."""
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def config_problem(directory: Path) -> str | None:
    """What is wrong with `directory`'s config.json (missing, not JSON, no `model_type`), or None."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return f"it has no {CONFIG_FILE} (the model's architecture and sizes)"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its {CONFIG_FILE} is not valid JSON ({err})"
    if not isinstance(config, dict) or "model_type" not in config:
        return f"its {CONFIG_FILE} has no \"model_type\" (transformers cannot tell which architecture it is)"
    return None


def tokenizer_problem(directory: Path) -> str | None:
    """What is wrong with `directory`'s tokenizer.json (it does not parse), or None (fine, or absent)."""
    from tokenizers import Tokenizer

    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for every file it cannot parse
        return f"its {TOKENIZER_FILE} cannot be parsed ({str(err).strip()})"
    return None


def bad_model_dir_message(flag: str, directory: Path, problem: str) -> str:
    """The ConfigError text for a local model directory with `problem`."""
    return (f"{flag} {str(directory)!r}: {problem}. Point {flag} at a complete model directory, as "
            f"`save_pretrained` writes it or a hub snapshot holds it ({CONFIG_FILE}, the weights "
            f"model*.safetensors, {TOKENIZER_FILE}): copy the missing or broken file again from where the model "
            f"came from, or give a Hugging Face id or 'tiny'.")
