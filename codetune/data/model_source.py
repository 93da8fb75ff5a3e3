"""What is wrong with a local model directory, said before transformers fails on it with its own traceback.

transformers reports a broken directory by what it happened to trip over: a directory without `config.json` is
"Unrecognized model ... should have a `model_type` key" (a ValueError), an unparseable `tokenizer.json` a bare
JSONDecodeError or KeyError. These checks name the file and what is wrong with it, so the error can say the fix.
They are cheap: `config.json` is read before loading (a few KB); `tokenizer.json` is parsed only after a load
failed, to find out whether it was the cause.

**Path or hub id.** A value that exists on disk is a path. One that does not is still a path when it cannot be a
Hugging Face id, which is `name` or `namespace/name`: it starts with `.`, `/` or `~`, holds more than one `/`, or
holds a backslash. Such a value is refused here, instead of reaching the hub client, which would answer
"Repo id must be in the form ..."; any other value is left to the download, which can take minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from codetune.errors import ConfigError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Either one lets transformers' AutoTokenizer load a directory without config.json.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")
# The pretrained model shipped inside the package (its model card: codetune/embedded/README.md). The name wins
# over a directory of that name in the working directory, as 'tiny' does; `./embedded` names the directory.
EMBEDDED_NAME = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / EMBEDDED_NAME


def model_location(name_or_path: str | Path) -> str:
    """What transformers loads for `name_or_path`: the package's directory for 'embedded', else the value itself."""
    return str(EMBEDDED_DIR) if str(name_or_path) == EMBEDDED_NAME else str(name_or_path)


def local_model_dir(name_or_path: str | Path) -> Path | None:
    """The directory `name_or_path` names ('embedded': the package's), or None for a hub id (or anything that is
    not a directory)."""
    path = Path(model_location(name_or_path)).expanduser()
    return path if path.is_dir() else None


def written_as_path(value: str) -> bool:
    """Whether `value` cannot be a Hugging Face id, so that it can only name a path (see the module docstring)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value


def check_model_source(name_or_path: str, flag: str, tokenizer_only: bool = False) -> None:
    """Raise one ConfigError naming `flag` when `name_or_path` names a path but no model directory: one that does not
    exist, a file, or a directory whose config.json is missing or broken. With `tokenizer_only` (only its tokenizer
    is loaded) a directory that holds a tokenizer file (`TOKENIZER_FILES`) needs no config.json. A hub id passes (it
    is checked when it loads). Callers leave out the built-in 'tiny', which is a name even where a directory of that
    name exists."""
    if not name_or_path.strip():
        raise ConfigError(f"{flag} is empty: give a Hugging Face id (e.g. Qwen/Qwen2.5-Coder-1.5B), a local model "
                          f"directory, or 'embedded' (offline).")
    if name_or_path == EMBEDDED_NAME and not (EMBEDDED_DIR / CONFIG_FILE).is_file():
        raise ConfigError(f"{flag} {EMBEDDED_NAME!r}: this install has no embedded model ({EMBEDDED_DIR} holds no "
                          f"{CONFIG_FILE}). Build it with `make embedded-model` (bench/embedded_model.py), or use "
                          f"'tiny' offline, a local model directory or a Hugging Face id.")
    path = Path(model_location(name_or_path)).expanduser()
    if path.is_dir():
        has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
        problem = None if tokenizer_only and has_tokenizer else config_problem(path)
        if problem:
            raise ConfigError(bad_model_dir_message(flag, path, problem))
    elif path.exists():
        raise ConfigError(f"{flag} {name_or_path!r} is a file, not a model directory. Point {flag} at the directory "
                          f"that holds {CONFIG_FILE}, the weights and {TOKENIZER_FILE}.")
    elif written_as_path(name_or_path):
        raise ConfigError(
            f"{flag} {name_or_path!r}: no such directory (resolved to {str(path.absolute())!r}), and it cannot be a "
            f"Hugging Face id, which is 'name' or 'namespace/name'. Fix the path to the model directory (one that "
            f"holds {CONFIG_FILE}), or give a Hugging Face id such as Qwen/Qwen2.5-Coder-1.5B, or 'embedded' (offline).")


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
            f"came from, or give a Hugging Face id or 'embedded' (offline).")
