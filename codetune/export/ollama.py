"""`--to ollama`: the same `adapter.gguf` as `--to gguf` and a `Modelfile`: `FROM` the base (its Ollama library
name when codetune knows it, e.g. Qwen/Qwen2.5-Coder-1.5B -> `qwen2.5-coder:1.5b-base`; else `--base`; a local
base directory, as 'tiny' runs have, is given as its path, which Ollama imports for the architectures it
supports), `ADAPTER ./adapter.gguf`, a `TEMPLATE` that sends the editor's prefix and suffix as the base family's
fill-in-the-middle request (the run trained on raw code, not chat), and one `PARAMETER stop` per end-of-text
and FIM sentinel of the base's tokenizer. The command prints the `ollama create` and `ollama run` commands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from codetune.errors import ConfigError
from codetune.export.adapter import Adapter
from codetune.export.base import OLLAMA_LIBRARY
from codetune.export.gguf import GGUF_FILE, write_adapter_gguf
from codetune.export.record import Exported

if TYPE_CHECKING:
    from codetune.data.fim import FimTokens
    from codetune.run.finished import RunConfig

MODELFILE = "Modelfile"


def ollama_base(config: RunConfig, given: str | None) -> str:
    """What the Modelfile's FROM names: `--base` (a path that exists, made absolute, or an Ollama model name),
    else the base's local directory ('tiny': the run's base_model/), else its Ollama library name."""
    if given:
        path = Path(given).expanduser()
        if path.exists():
            return str(path.resolve())
        if given.startswith((".", "/", "~")) or given.endswith(".gguf"):
            raise ConfigError(f"--base {given!r} does not exist. Give the Ollama name of the base (e.g. "
                              f"qwen2.5-coder:1.5b-base) or the path of a GGUF file or model directory of it.")
        return given
    local = Path(config.base_source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    known = OLLAMA_LIBRARY.get(config.name_or_path.lower())
    if known is None:
        raise ConfigError(f"--base: codetune does not know the Ollama library name of {config.name_or_path!r}. Give "
                          f"it (e.g. --base qwen2.5-coder:1.5b-base, see ollama.com/library), or the path of a GGUF "
                          f"file of the base (llama.cpp's convert_hf_to_gguf.py writes one).")
    return known


def modelfile(base: str, eos: str | None, fim: FimTokens | None, source: str) -> str:
    """The Modelfile text: FROM, ADAPTER, a FIM TEMPLATE when the base has plain-text sentinels, and stops."""
    lines = [f"# Written by codetune export from {source}.", f"FROM {base}", f"ADAPTER ./{GGUF_FILE}"]
    stops = [eos] if eos else []
    if fim is not None:
        sentinels = [fim.prefix_text, fim.suffix_text, fim.middle_text, *([fim.file_sep_text] if fim.file_sep_text
                                                                          else [])]
        if not any("▁" in s for s in sentinels):  # SentencePiece sentinels (Code Llama) have no plain-text form
            request = fim.psm_prompt("{{ .Prompt }}", "{{ .Suffix }}")
            lines.append(f'TEMPLATE """{{{{- if .Suffix }}}}{request}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"""')
            stops += sentinels
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def ollama_model_name(run_dir: Path) -> str:
    """A name `ollama create` takes: lower case letters, digits, '.', '_' and '-'."""
    return "codetune-" + (re.sub(r"[^a-z0-9._-]+", "-", run_dir.resolve().name.lower()).strip("-._") or "run")


def export_ollama(config: RunConfig, adapter: Adapter, tmp: Path, out: Path, outtype: str,
                  base: str | None) -> Exported:
    """`--to ollama`: adapter.gguf and the Modelfile in `tmp` (to become `out`), and the ollama commands."""
    from codetune.data.fim import find_fim_tokens
    from codetune.run.finished import load_tuned_tokenizer

    from_base = ollama_base(config, base)
    written = write_adapter_gguf(config, adapter, tmp, outtype, "ollama")
    tokenizer = load_tuned_tokenizer(config)
    text = modelfile(from_base, tokenizer.eos_token, find_fim_tokens(tokenizer), str(config.run_dir.resolve()))
    (tmp / MODELFILE).write_text(text, encoding="utf-8")
    name = ollama_model_name(config.run_dir)
    create, run = f"ollama create {name} -f {(out / MODELFILE).resolve()}", f"ollama run {name} 'fn main() {{'"
    return Exported({**written.details, "from": from_base, "ollama_create": create, "ollama_run": run},
                    [*written.next_steps, create, run])
