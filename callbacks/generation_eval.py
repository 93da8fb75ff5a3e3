"""Before/after evaluation: does the tuned model write code more like the repository than the base did?"""

from __future__ import annotations

import json
import math
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from codetune.backoff import is_out_of_memory
from codetune.compare import EVAL_METRICS, delta, format_value, verdict
from codetune.data.tokens import pad_token_id
from codetune.errors import ConfigError
from codetune.eval.metrics import chrf, mean_next_line_exact_match, perplexity_from_loss, syntax_validity_rate
from codetune.eval.prompts import RepoPrompt, repo_prompts
from codetune.run import atomic_write_text

SAMPLES_DIR = "samples"
BASE = "base"
# How long the other ranks wait for rank zero's generations: far above any eval's bounded cost, yet finite if
# rank zero hangs (if it fails, its process exits and the waiting ranks' barrier fails at once).
EVAL_WAIT_TIMEOUT = timedelta(hours=6)


class GenerationEval(Callback):
    """Measures the base model once before training and the tuned model at every epoch end, on
    files it never trained on, and shows the samples. Rank zero generates and writes.

    Metrics (``codetune/eval/metrics.py`` defines each precisely):

    - ``perplexity``: exp of the mean token NLL on the validation windows (held-out files). The base
      is measured with the adapter disabled before the first step; an epoch's figure is the
      validation run at that epoch's end (``val/loss``).
    - ``next_line_exact_match`` and ``chrf``: from *repo prompts*, held-out files cut just after
      the first line of a function or item (``codetune/eval/prompts.py``), the greedy continuation
      against the file's own continuation.
    - ``syntax_valid``: the share of repo-prompt completions (Rust and Python) whose file prefix +
      completion parses with tree-sitter. A completion that ended with EOS must parse whole; one cut
      by ``max_new_tokens`` is judged by the rule in ``syntax_valid`` (its last two non-blank lines
      are forgiven), and is only scored when it has more than two non-blank lines, since otherwise
      nothing of it would be judged. None when no completion could be scored.

    The config's language prompts (``fn process``, ``def analyze_``...) are generated too and shown,
    not scored: they have no reference, and whether a keyword appears is not a quality measure.

    Output: ``samples/base.jsonl`` and ``samples/epoch_<n>.jsonl`` (one JSON object per prompt:
    ``kind`` language/repo, ``prompt`` or ``path``/``line``, ``completion``, ``truth``,
    ``new_tokens``), TensorBoard text (``samples/...``) and scalars (``eval/<metric>``), and the
    manifest's ``phase_5_evaluation``: ``base``, ``epochs`` (metrics and eval seconds of each),
    ``final``, ``delta`` (final - base) and ``eval_seconds``. At the end of training a table prints
    base -> tuned with the change.

    Cost is bounded: at most ``repo_prompts`` + ``len(prompts)`` generations of at most
    ``max_new_tokens`` each per eval, in batches of ``batch_size`` (left-padded); an out-of-memory
    error halves the batch and retries, and at batch 1 the eval of that epoch is skipped with a
    warning (recorded in the manifest) rather than ending the run. cuBLAS and cuDNN workspace
    allocation failures count as out of memory (``codetune.backoff.is_out_of_memory``); any other
    error ends the run.

    Under DDP every rank computes its share of the base model's held-out loss (one collective), then
    rank zero alone generates while the other ranks wait in a barrier of a separate gloo process group
    created in ``setup``, whose timeout (``EVAL_WAIT_TIMEOUT``, 6 h) is not the training group's: no
    collective of the training group is pending meanwhile, so an eval longer than that group's timeout
    (``--trainer.strategy`` ``init_args.timeout``, 30 min by default) does not crash the other ranks.

    Args:
        prompts: Language prompts to complete (e.g. ``fn process``, ``impl``, ``#[derive(``).
        max_new_tokens: Tokens generated per prompt.
        repo_prompts: Number of completion prompts cut from held-out files (0 disables them).
        batch_size: Prompts per generate call.
        base_eval: Measure the base model (adapter disabled) before training.
        do_sample: Sample instead of greedy decoding (greedy is reproducible).
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling threshold (with ``do_sample``).
        seed: Seed of the repo-prompt choice.

    Example (YAML)::

        generation:
          prompts: ["fn process", "impl"]
          max_new_tokens: 512
          repo_prompts: 16
    """

    def __init__(self, prompts: list[str] = [], max_new_tokens: int = 256, repo_prompts: int = 16,
                 batch_size: int = 8, base_eval: bool = True, do_sample: bool = False, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0) -> None:
        problems = []
        if max_new_tokens < 1:
            problems.append(f"--generation.max_new_tokens={max_new_tokens}: must be a positive integer")
        if any(not p for p in prompts):
            problems.append("--generation.prompts: prompts must be non-empty strings")
        if repo_prompts < 0:
            problems.append(f"--generation.repo_prompts={repo_prompts}: must be >= 0 (0 disables them)")
        if batch_size < 1:
            problems.append(f"--generation.batch_size={batch_size}: must be a positive integer")
        if problems:
            raise ConfigError("; ".join(problems))
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.n_repo_prompts = repo_prompts
        self.batch_size = batch_size
        self.base_eval = base_eval
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.results: dict[str, Any] = {"base": None, "epochs": []}
        self._repo_prompts: list[RepoPrompt] = []
        self._wait_group: Any = None  # the gloo group the other ranks wait in (DDP only)

    # -- hooks -------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and torch.distributed.is_initialized():
            # A collective: every rank creates the group, in the same order.
            self._wait_group = torch.distributed.new_group(backend="gloo", timeout=EVAL_WAIT_TIMEOUT)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wait_group is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group(self._wait_group)
        self._wait_group = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._repo_prompts = repo_prompts(trainer.datamodule.val_sources, self.n_repo_prompts,
                                              seed=self.seed) if self.n_repo_prompts else []
        # Every rank holds the same results (from the same checkpoint), so all take the same branch.
        if not self.base_eval or self.results["base"] is not None:  # not again when a run resumes
            return
        with pl_module.model.disable_adapter(), torch.random.fork_rng(devices=[]):
            # fork_rng: the validation loader draws a seed from the global RNG (see _evaluate).
            base_nll = pl_module.held_out_loss()  # on every rank: each computes its share, all get the mean
            if trainer.is_global_zero:
                self.results["base"] = self._evaluate(trainer, pl_module, BASE, base_nll)
        self._wait_for_rank_zero()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            val_loss = trainer.callback_metrics.get("val/loss")
            result = self._evaluate(trainer, pl_module, f"epoch_{trainer.current_epoch}",
                                    float(val_loss) if val_loss is not None else None)
            self.results["epochs"].append({"epoch": trainer.current_epoch, "step": trainer.global_step, **result})
        self._wait_for_rank_zero()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.results["epochs"]:
            Console().print(comparison_table(self.manifest_phases()["phase_5_evaluation"]))

    def _wait_for_rank_zero(self) -> None:
        """All ranks meet once rank zero finished its generations, in the long-timeout gloo group: the others
        wait here rather than in their next collective of the training group, which would time out."""
        if self._wait_group is not None:
            torch.distributed.barrier(group=self._wait_group)

    # -- one evaluation ----------------------------------------------------------------------------

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str,
                  mean_nll: float | None) -> dict[str, Any]:
        # Evaluating must not change what is learned: data loaders and sampling draw from the global
        # RNG, which would otherwise shift every later dropout mask of training.
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            return self._evaluate_unseeded(trainer, pl_module, name, mean_nll)

    def _evaluate_unseeded(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str,
                           mean_nll: float | None) -> dict[str, Any]:
        started = time.perf_counter()
        texts = [p.model_input for p in self._repo_prompts] + self.prompts
        try:
            completions = self._generate(pl_module, texts)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; so are cuBLAS/cuDNN allocation failures
            if not is_out_of_memory(err):
                raise
            warnings.warn(f"codetune: the generation eval '{name}' ran out of memory at batch 1 and was skipped; "
                          f"lower --generation.max_new_tokens or --generation.repo_prompts.", stacklevel=2)
            return {"metrics": {"perplexity": _perplexity(mean_nll)}, "skipped": "out of memory",
                    "eval_seconds": round(time.perf_counter() - started, 3)}
        repo, language = completions[:len(self._repo_prompts)], completions[len(self._repo_prompts):]
        metrics = {"perplexity": _perplexity(mean_nll), **self._completion_metrics(repo)}
        samples = self._samples(repo, language)
        self._write(trainer, name, samples, metrics)
        return {"metrics": metrics, "eval_seconds": round(time.perf_counter() - started, 3)}

    def _completion_metrics(self, completions: list[tuple[str, int]]) -> dict[str, float | None]:
        if not completions:
            return {"next_line_exact_match": None, "chrf": None, "syntax_valid": None}
        generated = [text for text, _ in completions]
        truths = [p.continuation for p in self._repo_prompts]
        syntax = syntax_validity_rate(
            (p.program(text), p.language, n >= self.max_new_tokens)
            for p, (text, n) in zip(self._repo_prompts, completions)
            if _syntax_scorable(text, n >= self.max_new_tokens))
        return {"next_line_exact_match": mean_next_line_exact_match(generated, truths),
                "chrf": chrf(generated, truths), "syntax_valid": syntax}

    def _samples(self, repo: list[tuple[str, int]], language: list[tuple[str, int]]) -> list[dict[str, Any]]:
        samples = [{"kind": "repo", "path": p.path, "line": p.line, "prompt_tail": p.model_input[-200:],
                    "completion": text, "truth": p.continuation, "new_tokens": n}
                   for p, (text, n) in zip(self._repo_prompts, repo)]
        samples += [{"kind": "language", "prompt": prompt, "completion": text, "new_tokens": n}
                    for prompt, (text, n) in zip(self.prompts, language)]
        return samples

    def _write(self, trainer: L.Trainer, name: str, samples: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        path = Path(trainer.default_root_dir) / SAMPLES_DIR / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        scalars = {f"eval/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics({f"{k}_{BASE}" if name == BASE else k: v for k, v in scalars.items()},
                               step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for i, sample in enumerate(samples):
                    tag = f"samples/{name if name == BASE else 'tuned'}/{sample['kind']}_{i}"
                    logger.experiment.add_text(tag, _markdown(sample), global_step=trainer.global_step)

    # -- generation --------------------------------------------------------------------------------

    def _generate(self, pl_module: L.LightningModule, texts: list[str]) -> list[tuple[str, int]]:
        """(completion, new token count) per text, in batches that halve on an out-of-memory error."""
        results: list[tuple[str, int]] = []
        batch_size = self.batch_size
        while len(results) < len(texts):
            batch = texts[len(results):len(results) + batch_size]
            try:
                results += self._generate_batch(pl_module, batch)
                continue
            except RuntimeError as err:  # torch.OutOfMemoryError is one; so are cuBLAS/cuDNN allocation failures
                if batch_size == 1 or not is_out_of_memory(err):
                    raise
            # Past the except block the traceback is dropped, and with it the failed batch's tensors.
            batch_size //= 2
            if pl_module.device.type == "cuda":
                torch.cuda.empty_cache()
        return results

    @torch.no_grad()
    def _generate_batch(self, pl_module: L.LightningModule, texts: list[str]) -> list[tuple[str, int]]:
        tokenizer, model = pl_module.tokenizer, pl_module.model
        ids, mask = _left_padded(tokenizer(texts, add_special_tokens=False)["input_ids"], pad_token_id(tokenizer))
        ids, mask = ids.to(pl_module.device), mask.to(pl_module.device)
        was_training = model.training
        model.eval()
        try:
            sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
            # Under the trainer's autocast, as in training: the adapters take the 16-bit input as it is.
            with pl_module.trainer.precision_plugin.forward_context():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                     do_sample=self.do_sample, pad_token_id=pad_token_id(tokenizer), **sampling)
        finally:
            model.train(was_training)
        new = out[:, ids.shape[1]:]
        pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
        counts = [int(((row != pad) & (row != eos)).sum()) + int((row == eos).any()) for row in new]
        return [(tokenizer.decode(row, skip_special_tokens=True), n) for row, n in zip(new, counts)]

    # -- manifest and state ------------------------------------------------------------------------

    def manifest_phases(self) -> dict[str, dict[str, Any]]:
        """`phase_5_evaluation` for the manifest: base, each epoch, final, delta, eval seconds."""
        epochs = self.results["epochs"]
        base = (self.results["base"] or {}).get("metrics")
        final = epochs[-1]["metrics"] if epochs else None
        return {"phase_5_evaluation": {
            "base": base,
            "epochs": epochs,
            "final": final,
            "delta": _delta(base, final),
            "eval_seconds": round(sum(e["eval_seconds"] for e in epochs)
                                  + (self.results["base"] or {}).get("eval_seconds", 0.0), 3),
            "repo_prompts": len(self._repo_prompts),
            "language_prompts": len(self.prompts),
            "max_new_tokens": self.max_new_tokens,
        }}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict.get("results", {"base": None, "epochs": []})


def comparison_table(phase: dict[str, Any]) -> Table:
    """Rich table: metric, base, tuned, change (with whether the change is an improvement)."""
    table = Table(title="Evaluation on held-out files: base -> tuned", title_justify="left")
    for name, justify in (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    base, final = phase["base"] or {}, phase["final"] or {}
    for key, label, better in EVAL_METRICS:
        b, f = base.get(key), final.get(key)
        table.add_row(label, format_value(b), format_value(f), change_cell(delta(f, b), better))
    return table


def change_cell(change: float | None, better: str) -> str:
    """The change, green when it is an improvement in a metric whose `better` direction is given."""
    if change is None:
        return ""
    if change == 0:
        return "0"
    return f"[{'green' if verdict(change, better) == 'better' else 'red'}]{change:+.4g}[/]"


def _delta(base: dict[str, Any] | None, final: dict[str, Any] | None) -> dict[str, float | None] | None:
    if not base or not final:
        return None
    return {k: delta(final.get(k), base.get(k)) for k, _, _ in EVAL_METRICS}


def _syntax_scorable(completion: str, truncated: bool) -> bool:
    """Whether a completion says anything about syntax. The rule for cut-off code forgives its last
    two non-blank lines (see `syntax_valid`), so a cut-off completion is scored only when it has
    more lines than that; one that ended on its own (EOS) is always scored, strictly."""
    return not truncated or sum(1 for line in completion.splitlines() if line.strip()) > 2


def _perplexity(mean_nll: float | None) -> float | None:
    return None if mean_nll is None else perplexity_from_loss(mean_nll)


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left (generation continues at the right end of every row) and the mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _markdown(sample: dict[str, Any]) -> str:
    # TensorBoard renders text as markdown; fenced blocks keep code indentation.
    if sample["kind"] == "repo":
        return (f"`{sample['path']}:{sample['line']}`\n\n```\n...{sample['prompt_tail']}{sample['completion']}\n```"
                f"\n\ntruth:\n\n```\n{sample['truth']}\n```")
    return f"```\n{sample['prompt']}{sample['completion']}\n```"
