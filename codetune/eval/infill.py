"""Infill requests for one line of a file, as `codetune generate --infill FILE:LINE` asks them.

The file is cut around the line where the tokenizer's tokens break (`codetune.data.fim.line_cut_style`), with
the same cuts as the FIM eval's line masks (`codetune.eval.fim.mask_lines`) and training's FIM samples. "after"
(Qwen): the prefix ends with the previous line's line break, the middle is the line with its own. "before"
(GPT-2's byte-level BPE, 'tiny'): the prefix ends at the previous line's end, the middle is that line break,
then the line; that leading line break is the cut's `lead`.

The request is laid out as training's FIM samples, in PSM order: ``[<file_sep> path\\n] <prefix> P <suffix> S
<middle>``, each text part tokenized alone as training tokenized files, each sentinel by id. Generation stops
once the masked line has ended (`line_ended`): the rest of the middle would be other lines.

Only the standard library and codetune's light modules at import: `codetune generate --help` starts without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codetune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from codetune.data.fim import CutStyle, FimTokens
    from codetune.eval.stopping import Rule


def infill_prompt_ids(tokenizer: PreTrainedTokenizerBase, fim: FimTokens, prefix: str, suffix: str,
                      path: str | None = None) -> list[int]:
    """The ids of a PSM request, laid out as training's FIM samples: [<file_sep> path\\n] <prefix> P <suffix> S
    <middle> (no header when `path` is None), each text part tokenized alone as training tokenized files, and
    each sentinel by id."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    header = [] if path is None else [_file_sep(fim), *encode(f"{path}\n")]
    return [*header, fim.prefix, *encode(prefix), fim.suffix, *encode(suffix), fim.middle]


def _file_sep(fim: FimTokens) -> int:
    if fim.file_sep is None:
        raise ConfigError(f"the run trained with data.file_headers true, but its {fim.family} tokenizer has no file "
                          f"separator token to start the request with: its config.yaml does not match its base.")
    return fim.file_sep


@dataclass(frozen=True)
class LineCut:
    """A file cut around one line for an infill request: `prefix + middle + suffix` is the file.

    `middle` is what a perfect model writes: the line, with the line break that the cut style puts in the
    middle. `lead` is the line break the middle starts with ("before" style after line 1, else '')."""

    prefix: str
    middle: str
    suffix: str
    lead: str


def cut_around_line(text: str, line: int, style: CutStyle) -> LineCut:
    """Mask line `line` (1-based, within `split_lines`) of `text`, cut as the tokenizer breaks tokens: "after",
    both cuts at line starts; "before", both at line ends (the middle starts with the previous line's break)."""
    from codetune.eval.fim import mask_lines

    prefix, middle, suffix = mask_lines(text, line - 1, line - 1, style)
    lead = "" if style == "after" else middle[:len(middle) - len(middle.lstrip("\r\n"))][:2]
    return LineCut(prefix, middle, suffix, lead)


def masked_line(middle: str, lead: str) -> tuple[str, bool]:
    """The masked line in a generated middle: (its text, whether its line break was written). The middle's
    `lead` (or a start of it) is skipped: a model writing the line's own line break first has ended nothing."""
    body = middle[len(os.path.commonprefix([middle, lead])):]
    line = body.splitlines(keepends=True)[0] if body else ""
    content = line.splitlines()[0] if line else ""
    return content, len(content) < len(line)


def line_ended(lead: str) -> Rule:
    """The stopping rule of a line infill: done once `masked_line` holds a line break (the rest of the middle is
    other lines)."""
    return lambda text: masked_line(text, lead)[1]
