"""`codetune prepare --config C --model.name_or_path M --data.repo R --out DIR`: the data phases only.

It takes the same configs and flags as `fit` and runs phase 1 (scan) and phase 2 (tokenize and
pack) exactly as training would, then writes, for inspection or for another trainer:

* `train.npy`, `val.npy`: int32 token ids, shape `[windows, seq_len]` (`numpy.load`); files are
  joined with the tokenizer's EOS, padding fills the tail of the last window; with
  `--data.fim_rate`, training rows start with fill-in-the-middle samples (each inside one row, see
  `codetune.data.fim`) and left-to-right text fills the rest (`codetune.data.packing.pack_samples`);
* the tokenizer (`tokenizer.json` and its configs): `AutoTokenizer.from_pretrained(DIR)` loads it.
  The model fixes the tokenizer; with `tiny`, it is the BPE trained on the training files;
* `data_report.json`: the phase results that `fit` records in MANIFEST.json (files kept and skipped
  per reason, secrets redacted, tokens per split, windows, `packing_efficiency`, wall times), the
  files of each split, every skipped path with its reason, and every fill-in-the-middle sample: its
  file, piece (token range of the file's ids), order (psm/spm) and middle (token range in the piece),
  in packing order (phase_2_tokenize.fim has the settings and counts), and `output_files`.

No model weights are loaded (for a hub or local model only its config is read, to check that
`--data.seq_len` fits its context). `DIR` is written atomically: it appears whole or not at all.
data_report.json's `output_files` lists every file written, so a later `prepare` may replace an earlier output
that holds only those; a directory holding anything else (a file added since), or not marked, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from codetune.cli import CodetuneCLI, build_cli
from codetune.data.datamodule import CodeDataModule
from codetune.data.model_source import local_model_dir
from codetune.errors import ConfigError
from codetune.data.tokenizer import TINY_NAME
from codetune.storage import PREPARE_MARKER, atomic_save_dir, replaceable_output_dir, write_output_marker

REPORT_NAME = PREPARE_MARKER


class PrepareCLI(CodetuneCLI):
    """The training CLI's arguments, plus `--out`; nothing is trained."""

    PROG = "codetune prepare"
    DESCRIPTION = ("Only scan, tokenize and pack a repository, exactly as `codetune fit` would, into --out: train.npy, "
                   "val.npy (int32 windows), the tokenizer and data_report.json. Takes fit's --config, --model.* "
                   "and --data.* flags.")

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--out", type=str | None, default=None,
                            help="Directory to write train.npy, val.npy, the tokenizer and data_report.json to.")


def main(args: Sequence[str]) -> int:
    cli = build_cli(list(args), PrepareCLI, run=False)
    out = _output_dir(cli.config.out)
    model = cli.config.model
    _check_model_context(model.name_or_path, cli.datamodule.seq_len, model.trust_remote_code)
    cli.datamodule.setup("fit")
    write_prepared(out, cli.datamodule)
    report = cli.datamodule.report
    print(f"codetune prepare: {report['phase_1_scan']['files_kept']} files, "
          f"{report['phase_2_tokenize']['train_windows']} train / {report['phase_2_tokenize']['val_windows_used']} val "
          f"windows of {cli.datamodule.seq_len} tokens, packing efficiency "
          f"{report['phase_2_tokenize']['packing_efficiency']:.2%}", flush=True)
    print(out, flush=True)
    return 0


def write_prepared(out: Path, datamodule: CodeDataModule) -> None:
    """Write the arrays, tokenizer and report of a set-up data module into `out`, atomically."""
    with atomic_save_dir(out) as tmp:
        for split, windows in (("train", datamodule.train_windows), ("val", datamodule.val_windows)):
            np.save(tmp / f"{split}.npy", windows.input_ids.astype(np.int32, copy=False))
        datamodule.tokenizer.save_pretrained(tmp)
        write_output_marker(tmp, REPORT_NAME, data_report(datamodule))


def data_report(datamodule: CodeDataModule) -> dict[str, Any]:
    """The data module's phase results, with the headline figures and file lists on top."""
    phases = datamodule.report
    return {
        "repo": str(datamodule.repo.resolve()),
        "seq_len": datamodule.seq_len,
        "packing": datamodule.packing,
        "packing_efficiency": phases["phase_2_tokenize"]["packing_efficiency"],
        "files_skipped": phases["phase_1_scan"]["files_skipped"],
        "secrets_redacted": phases["phase_1_scan"]["secrets_redacted"],
        "arrays": {
            "train.npy": list(datamodule.train_windows.input_ids.shape),
            "val.npy": list(datamodule.val_windows.input_ids.shape),
        },
        **phases,
        "files": datamodule.split_files,
        "skipped": [{"path": s.rel_path, "reason": s.reason} for s in datamodule.skipped],
        # In packing order: the k-th <fim_prefix> of train.npy (row-major) starts the k-th sample.
        "fim_samples": [{"path": r.path, "piece": r.piece, "tokens": [r.start, r.end], "order": r.cut.order,
                         "middle": [r.cut.middle_start, r.cut.middle_end]} for r in datamodule.fim_records],
    }


def _output_dir(out: str | None) -> Path:
    if not out:
        raise ConfigError("--out is required: the directory to write the prepared data to, e.g. --out prepared/")
    return replaceable_output_dir(out, REPORT_NAME, "codetune prepare")


def _check_model_context(name_or_path: str, seq_len: int, trust_remote_code: bool) -> None:
    """The window must fit the model's context; only the model's config is read, never its weights."""
    if name_or_path == TINY_NAME:
        return  # the tiny model is built with a context of at least seq_len
    from transformers import AutoConfig

    from codetune.model.loading import check_context

    try:
        config = AutoConfig.from_pretrained(str(local_model_dir(name_or_path) or name_or_path),
                                            trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"--model.name_or_path {name_or_path!r}: its config could not be loaded "
                          f"({str(err).strip().rstrip('.')}). Use a local model directory or a cached hub id, "
                          f"or 'embedded'.") from err
    check_context(seq_len, config)
