"""The embedded model's own figures on code reserved for evaluation, and its model card.

Each figure is a codetune fit of the embedded model on a reserved package, as a user would run it: tuned for
150 optimizer steps of 8 x 256 tokens on part of its files and measured on the rest (the fit's base -> tuned
table). The base column is the pretrained model's own figure on files it never saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKIO = Path("/usr/share/cargo/registry")
REQUESTS = Path("/usr/lib/python3/dist-packages/requests")
METRICS = ("perplexity", "next_line_exact_match", "chrf", "fim_exact_match", "fim_chrf")
# (name, config, repository, held-out share): tokio's tenth as the issue fixes it; requests has 18 files, so
# half of them are held out to give its figures more than one file's prompts.
RESERVED = (("tokio", "configs/training_config_rust.yaml", None, 0.1),
            ("requests", "configs/training_config.yaml", REQUESTS, 0.5))
TUNE = ["--model.name_or_path", "embedded", "--model.quantization", "none", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "150", "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "150",
        "--trainer.check_val_every_n_epoch", "null", "--data.seq_len", "256", "--data.batch_size", "8",
        "--data.gradient_accumulation_steps", "1", "--data.file_headers", "true",
        "--model.learning_rate", "3.0e-3", "--model.warmup_steps", "10",
        "--generation.max_new_tokens", "48", "--generation.repo_prompts", "48", "--generation.fim_prompts", "48"]


def tokio_dir() -> Path:
    found = sorted(TOKIO.glob("tokio-1.*"))
    if not found:
        raise SystemExit(f"no tokio crate under {TOKIO}: apt-get install librust-tokio-dev")
    return found[-1]


def reserved_figures(python: str = sys.executable) -> dict:
    """{package: {"base": {...}, "tuned": {...}, "prompts": {...}, "seconds": s}} from one fit per package."""
    out = {}
    for name, config, repo, val_fraction in RESERVED:
        repo = repo or tokio_dir()
        with tempfile.TemporaryDirectory() as runs:
            started = time.perf_counter()
            subprocess.run([python, "-m", "codetune", "fit", "--config", config, *TUNE, "--data.repo", str(repo),
                            "--data.val_fraction", str(val_fraction), "--runs_dir", runs, "--run_name", name],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            manifest = json.loads((Path(runs) / name / "MANIFEST.json").read_text())
        evaluation = manifest["phase_results"]["phase_5_evaluation"]
        out[name] = {"repo": str(repo), "val_fraction": val_fraction, "seconds": time.perf_counter() - started,
                     "base": {k: evaluation["base"].get(k) for k in METRICS},
                     "tuned": {k: evaluation["final"].get(k) for k in METRICS},
                     "prompts": {"repo": evaluation.get("repo_prompts_scored"),
                                 "fim": evaluation.get("fim_prompts_scored")}}
    return out
