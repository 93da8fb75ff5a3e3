"""The embedded model's card, `codetune/embedded/README.md`, written from the build's own records."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from embedded.card import METRICS

HEADINGS = {"perplexity": "held-out perplexity", "next_line_exact_match": "next-line exact match",
            "chrf": "completion chrF", "fim_exact_match": "FIM line exact match", "fim_chrf": "FIM body chrF"}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def package_tokens(corpus: Path, summary: dict, tokenizer) -> dict[str, int]:
    """Tokens of each package's files under the embedded tokenizer (end-of-text, FIM and headers excluded)."""
    out = {}
    for package in summary["packages"]:
        texts = [(corpus / f).read_text(errors="replace") for f in package["files"]]
        out[package["name"]] = sum(len(ids) for ids in tokenizer(texts).input_ids)
    return out


# What the sessions recorded before their FIM recipe was a flag ran with: the build's first recipe.
FIRST_RECIPE = {"spm_rate": 0.5, "line_rate": 0.0, "block_rate": 0.0, "block_lines": 8}


def recipe_text(recipe: dict) -> str:
    order = ("PSM only" if recipe["spm_rate"] == 0 else
             f"{1 - recipe['spm_rate']:.0%} PSM, {recipe['spm_rate']:.0%} SPM")
    if recipe["line_rate"] == 0 and recipe["block_rate"] == 0:
        return f"{order}, uniform middles"
    return (f"{order}; middles: {recipe['line_rate']:.0%} one line, {recipe['block_rate']:.0%} blocks of 2 to "
            f"{recipe['block_lines']} lines, the rest uniform")


def sessions_table(sessions: list[dict]) -> list[str]:
    """One row per pretraining session: the steps it took the model from and to, its step budget (which sets
    where its learning rate decays), its FIM recipe and its hours; a session that ended before its first
    checkpoint took it nowhere."""
    lines = ["| session | steps | budget | fill-in-the-middle | hours |", "|---|---|---|---|---|"]
    step = 0
    for i, session in enumerate(sessions, 1):
        note = f" ({session['killed']})" if "killed" in session else ""
        lines.append(f"| {i} | {step:,} -> {session['step']:,}{note} | {session['max_steps']:,} | "
                     f"{recipe_text(session.get('fim', FIRST_RECIPE))} | "
                     f"{(session['ended'] - session['started']) / 3600:.2f} |")
        step = max(step, session["step"])
    return lines


def pretraining_record(work: Path) -> dict:
    """Steps, tokens and wall time of the pretraining, from its hyper-parameters, log and session times."""
    import torch

    checkpoint = torch.load(work / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sessions = json.loads((work / "sessions.json").read_text())
    steps = checkpoint["global_step"]
    return {"steps": steps, "tokens": steps * 16 * 512, "hparams": checkpoint["hyper_parameters"],
            "wall_hours": sum(s["ended"] - s["started"] for s in sessions) / 3600, "sessions": sessions}


def figure(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if value > 1.5 else f"{value:.3f}"


def figures_table(figures: dict) -> list[str]:
    lines = ["| metric | " + " | ".join(f"{name} base | {name} tuned" for name in figures) + " |",
             "|---|" + "---|---|" * len(figures)]
    for key in METRICS:
        cells = " | ".join(f"{figure(f['base'][key])} | {figure(f['tuned'][key])}" for f in figures.values())
        lines.append(f"| {HEADINGS[key]} | {cells} |")
    return lines


def overfit_notes(figures: dict) -> list[str]:
    """A line for each package whose tuning raised the held-out perplexity, saying why it can."""
    notes = [f"- {name}: tuning raised the held-out perplexity ({figure(f['base']['perplexity'])} -> "
             f"{figure(f['tuned']['perplexity'])}): 150 steps of 8 windows are many passes over so small a "
             f"training split, and the adapter overfits it (fewer steps suit a small repository)."
             for name, f in figures.items() if f["tuned"]["perplexity"] > f["base"]["perplexity"]]
    return ["", *notes] if notes else []


def corpus_table(summary: dict, tokens: dict[str, int]) -> list[str]:
    lines = ["| package | version | licence (as debian/copyright names it) | files | tokens |", "|---|---|---|---|---|"]
    for p in summary["packages"]:
        lines.append(f"| {p['name']} | {p['version']} | {p['licence']} | {len(p['files'])} | {tokens[p['name']]:,} |")
    return lines


def write_card(path: Path, work: Path, figures: dict) -> None:
    """Write the card atomically from WORK's corpus, pretraining record and the reserved-code figures."""
    from transformers import AutoTokenizer

    from codetune.storage import atomic_write_text

    summary = json.loads((work / "corpus" / "corpus.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    tokens = package_tokens(work / "corpus", summary, tokenizer)
    record = pretraining_record(work)
    record.update(vocabulary=len(tokenizer), corpus_tokens=sum(tokens.values()),
                  per_package_kb=summary["per_package_bytes"] // 1000)
    by_language = {}
    for p in summary["packages"]:
        entry = by_language.setdefault(p["language"], [0, 0, 0])
        entry[0] += 1
        entry[1] += len(p["files"])
        entry[2] += tokens[p["name"]]
    text = "\n".join(card_lines(record, by_language, figures, corpus_table(summary, tokens))) + "\n"
    atomic_write_text(path, text)


def card_lines(record: dict, by_language: dict, figures: dict, corpus_rows: list[str]) -> list[str]:
    hp = record["hparams"]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    tokio, requests = figures["tokio"], figures["requests"]
    return [
        "# The embedded model",
        "",
        "`--model.name_or_path embedded`: a small Llama pretrained from scratch on permissively licensed Rust and",
        "Python code, shipped inside codetune so that the demo, the tests and a first try need no download. It",
        "is what a real code model is, at a scale that trains on a laptop CPU: it writes plausible code and",
        "infills in the repository format, and a LoRA tuned on a repository lowers its perplexity there. It is",
        "too small to write most lines exactly: the figures below say how far it gets.",
        "",
        f"- Architecture: Llama, {hp['num_layers']} layers, hidden {hp['hidden_size']}, {hp['num_heads']} heads, "
        f"MLP {hp['intermediate_size']}, tied embeddings, RoPE, context 4,096; 16-bit safetensors.",
        f"- Tokenizer: byte-level BPE, {record['vocabulary']:,} entries, Qwen2's pre-tokenizer split, with "
        "Qwen2.5-Coder's special",
        "  tokens by name: `<|endoftext|>`, `<|fim_prefix|>`, `<|fim_middle|>`, `<|fim_suffix|>`, `<|fim_pad|>`,",
        "  `<|repo_name|>`, `<|file_sep|>`.",
        "- Licence: Apache-2.0, as codetune. Its corpus is MIT, Apache-2.0 or BSD code only (table below).",
        "- Never in its corpus, reserved for evaluation: the tokio crates (tokio, tokio-util, tokio-macros,",
        "  tokio-native-tls, tokio-rustls), the `requests` package, any copy of either vendored in another package",
        "  (pip's `pip/_vendor/requests/`), and codetune itself.",
        "",
        "## Rebuild",
        "",
        "```bash",
        "make embedded-model      # apt-get installs the packages, then python bench/embedded_model.py",
        "```",
        "",
        "Every phase resumes: the pretraining checkpoints every 50 steps, so running the command again after",
        "an interruption continues where it stopped.",
        "",
        "## Recipe",
        "",
        f"- {record['steps']:,} optimizer steps of 16 windows x 512 tokens: {record['tokens'] / 1e6:.1f}M tokens, "
        f"{record['tokens'] / record['corpus_tokens']:.2f} passes over the corpus's "
        f"{record['corpus_tokens'] / 1e6:.1f}M.",
        "- Every window as codetune fits it: files packed without attention across them, each headed",
        "  `<|file_sep|>path`, half the pieces fill-in-the-middle, redrawn every epoch (the order and middles",
        "  of each session below).",
        f"- AdamW (0.9, 0.95), weight decay {hp['weight_decay']}, peak learning rate {hp['learning_rate']}, "
        f"{hp['warmup_steps']} warmup steps, held, then a cosine decay to {hp['min_lr_ratio']}x over the last "
        f"{hp['decay_fraction']:.0%} of a session's step budget (a session resumed with a larger budget goes back",
        "  to the peak rate until its own decay); gradient clipping 1.0; fp32.",
        f"- Wall time: {record['wall_hours']:.2f} h on {os.cpu_count()} cores of an {cpu_name()} "
        f"({len(record['sessions'])} sessions, resumed from checkpoints), measured {date}.",
        "",
        *sessions_table(record["sessions"]),
        "",
        "## Figures on code it never saw",
        "",
        "Each column pair is one `codetune fit` of this model: the base is the model as shipped; tuned is after",
        "150 LoRA steps of 8 x 256 tokens on the package's other files (tokio: 9/10 of the crate, measured on",
        "the other tenth; requests: half its files, measured on the other half). Scored prompts (repo / FIM):",
        f"tokio {tokio['prompts']['repo']} / {tokio['prompts']['fim']}, "
        f"requests {requests['prompts']['repo']} / {requests['prompts']['fim']}.",
        "",
        *figures_table(figures),
        *overfit_notes(figures),
        "",
        "## Corpus",
        "",
        "".join(f"{lang}: {n} packages, {files:,} files, {toks / 1e6:.1f}M tokens. "
                for lang, (n, files, toks) in sorted(by_language.items())).strip(),
        f"Each package gives at most {record['per_package_kb']} KB of source, its files in a seeded order, and only "
        "the files whose",
        "licence its `debian/copyright` gives as MIT, Apache-2.0 or BSD (Debian 12 packages).",
        "",
        "<details><summary>Every package</summary>",
        "",
        *corpus_rows,
        "",
        "</details>",
    ]
