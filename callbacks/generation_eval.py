"""Before/after evaluation: does the tuned model write code more like the repository than the base did?"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from time import perf_counter
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from typing_extensions import override

from codetune.data.fim import FimTokens, line_cut_style
from codetune.errors import ConfigError
from codetune.eval.fim import FimPrompt, fim_prompts
from codetune.eval.generation import (Completion, Decoding, Request, fim_request, generate_requests,
                                      language_request, repo_request)
from codetune.eval.prompts import RepoPrompt, repo_prompts
from codetune.eval.report import comparison_table, metric_deltas
from codetune.eval.samples import sample_markdown, sample_records, sample_tags
from codetune.eval.scoring import completion_metrics, fim_metrics, no_completion_metrics, no_fim_metrics, perplexity
from codetune.memory.backoff import is_out_of_memory
from codetune.storage import atomic_write_text

SAMPLES_DIR = "samples"
FIM_MAX_PREFIX_CHARS, FIM_MAX_SUFFIX_CHARS = 1500, 800
REPO_MAX_PREFIX_CHARS, REPO_MAX_TRUTH_CHARS = 4000, 1200
BASE = "base"
# How long the other ranks wait for rank zero's generations: far above any eval's bounded cost, yet finite if
# rank zero hangs (if it fails, its process exits and the waiting ranks' barrier fails at once).
EVAL_WAIT_TIMEOUT = timedelta(hours=6)


class _PromptCounts(NamedTuple):
    """A number of repo prompts and of FIM prompts (asked, or generated)."""

    repo: int
    fim: int


class _Scored(NamedTuple):
    """Whether an eval's repo and its FIM completions are the run's prompt sets (so are scored)."""

    repo: bool
    fim: bool


class GenerationEval(Callback):
    """Measures the base model once before training and the tuned model at every epoch end, on
    files it never trained on, and shows the samples. Rank zero generates and writes.
    ``docs/evaluation.md`` explains each point below in depth.

    Metrics (``codetune/eval/metrics.py`` and ``codetune/eval/fim.py`` define each precisely,
    ``codetune/eval/scoring.py`` applies them to an eval's completions):

    - ``perplexity``: exp of the mean token NLL on the validation windows (held-out files). The base
      is measured with the adapter disabled before the first step; an epoch's figure is the
      validation run at that epoch's end (``val/loss``).
    - ``next_line_exact_match`` and ``chrf``: from *repo prompts*, held-out files cut before a line of
      code (Rust, Python; after a paragraph's first line elsewhere), as when a user presses Enter anywhere
      (``codetune/eval/prompts.py``), the greedy continuation against the file's own continuation.
    - ``syntax_valid``: the share of repo-prompt completions (Rust and Python) that parse with
      tree-sitter, judged on the part of the completion the two metrics above read.
    - ``fim_exact_match``, ``fim_chrf`` and ``fim_syntax_valid``: from *FIM prompts*, held-out files
      with a line or a function body masked, sent as an infill request in the tokenizer's own FIM
      format (headed ``<|file_sep|>path`` when the training files are, ``--data.file_headers``), prefix
      and suffix bounded so that a request fits a training window. Exact match reads the line masks,
      chrF the body masks, syntax validity every mask of a Rust or Python file that parses. None when
      the tokenizer has no FIM sentinels (the data module says so once), with ``fim_prompts`` 0.

    A metric is None when no completion of its kind could be scored. The config's language prompts
    (``fn process``, ``def analyze_``...) are generated too and shown, not scored.

    **Stopping early.** Every generation stops as soon as it holds what its metrics read
    (``codetune/eval/generation.py``), so every score equals the one the full ``max_new_tokens``
    completion would get; ``max_new_tokens`` stays the cap of every generation, a FIM line's is 48
    (``FIM_LINE_TOKENS``) and a language sample's ``sample_tokens``.

    **Budget.** With ``max_seconds``, an eval's generation starts no batch once that many seconds
    have passed since it began; a warning naming the flag says how many prompts were done. Repo
    prompts go first, then the FIM prompts, then the language samples. The first eval that generates
    fixes the repo and FIM prompts of the run (kept in the checkpoint): every later eval generates and
    scores those, and reports none of a set's metrics when it cannot finish that set, so base and
    tuned figures are always computed on the same prompts.

    Output: ``samples/base.jsonl`` and ``samples/epoch_<n>.jsonl`` (one JSON object per prompt,
    ``codetune/eval/samples.py``); TensorBoard scalars ``eval/<metric>`` and one text tag per prompt
    (``samples/repo_<i>``, ``samples/fim_<i>``, ``samples/language_<i>``), at the global step of the
    eval (the base is step 0 of the same curves); the manifest's ``phase_5_evaluation``
    (``manifest_phases``: base, epochs, final, delta, eval seconds, prompt counts, budget hits). At
    the end of training a table prints base -> tuned with the change.

    Cost is bounded: at most ``repo_prompts`` + ``fim_prompts`` + ``len(prompts)`` generations per
    eval, in batches of ``batch_size`` (left-padded), within ``max_seconds`` when set. An
    out-of-memory error (cuBLAS and cuDNN workspace failures included,
    ``codetune.memory.backoff.is_out_of_memory``) halves the batch and retries; at batch 1 the eval of
    that epoch is skipped with a warning (recorded in the manifest) rather than ending the run. Any
    other error ends the run. Under DDP rank zero alone generates while the other ranks wait in a
    gloo group of their own (``EVAL_WAIT_TIMEOUT``, 6 h), so a long eval does not trip the training
    group's timeout.

    Args:
        prompts: Language prompts to complete (e.g. ``fn process``, ``impl``, ``#[derive(``).
        max_new_tokens: Most tokens generated per prompt (a repo prompt stops earlier once it holds what
            its metrics read).
        sample_tokens: Most tokens generated per language prompt (shown, not scored); at most
            ``max_new_tokens`` are generated whatever this says.
        max_seconds: Wall-clock budget of each eval's generation, in seconds (None: no budget). No batch starts
            after it; the prompts left are reported, and the repo prompts the first eval finished are the ones
            every eval of the run scores.
        repo_prompts: Number of completion prompts cut from held-out files (0 disables them).
        fim_prompts: Number of fill-in-the-middle prompts masked in held-out files, half single lines and
            half function bodies (0 disables them; none are made when the tokenizer has no FIM sentinels).
        batch_size: Prompts per generate call.
        base_eval: Measure the base model (adapter disabled) before training. A base whose held-out loss is not
            finite (float16 overflow) stops the run there, naming the first layer that overflowed and what works
            on this card (`NonFiniteActivationsError`).
        do_sample: Sample instead of greedy decoding (greedy is reproducible).
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling threshold (with ``do_sample``).
        seed: Seed of the repo-prompt and FIM-prompt choice.

    Example (YAML)::

        generation:
          prompts: ["fn process", "impl"]
          max_new_tokens: 512
          sample_tokens: 64
          max_seconds: 120
          repo_prompts: 16
          fim_prompts: 16

    Raises:
        ConfigError: a setting is out of range (every problem named by its flag, in one message).
    """

    def __init__(self, prompts: list[str] = [], max_new_tokens: int = 256, sample_tokens: int = 64,
                 max_seconds: float | None = None, repo_prompts: int = 16, fim_prompts: int = 16,
                 batch_size: int = 8, base_eval: bool = True, do_sample: bool = False, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0) -> None:
        problems = []
        if max_new_tokens < 1:
            problems.append(f"--generation.max_new_tokens={max_new_tokens}: must be a positive integer")
        if sample_tokens < 1:
            problems.append(f"--generation.sample_tokens={sample_tokens}: must be a positive integer")
        if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
            problems.append(f"--generation.max_seconds={max_seconds}: must be a positive number of seconds, "
                            f"or null for no budget")
        if any(not p for p in prompts):
            problems.append("--generation.prompts: prompts must be non-empty strings")
        if repo_prompts < 0:
            problems.append(f"--generation.repo_prompts={repo_prompts}: must be >= 0 (0 disables them)")
        if fim_prompts < 0:
            problems.append(f"--generation.fim_prompts={fim_prompts}: must be >= 0 (0 disables them)")
        if batch_size < 1:
            problems.append(f"--generation.batch_size={batch_size}: must be a positive integer")
        if problems:
            raise ConfigError("; ".join(problems))
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.sample_tokens = sample_tokens
        self.max_seconds = max_seconds
        self.n_repo_prompts = repo_prompts
        self.n_fim_prompts = fim_prompts
        self.batch_size = batch_size
        self.base_eval = base_eval
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.results: dict[str, Any] = {"base": None, "epochs": []}
        self._repo_prompts: list[RepoPrompt] = []
        # How many of the repo prompts (the first ones) every eval scores; fixed by the first eval.
        self._scored_repo_prompts: int | None = None
        self._fim_prompts: list[FimPrompt] = []
        self._scored_fim_prompts: int | None = None  # as _scored_repo_prompts, for the FIM prompts
        self._fim_tokens: FimTokens | None = None
        self._file_headers = False  # whether the training files (so the requests) start with a file header
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
            self._fim_tokens = trainer.datamodule.fim_tokens
            # A header needs the file separator, which comes with the FIM tokens.
            self._file_headers = self._fim_tokens is not None and trainer.datamodule.hparams.file_headers
            prefix_chars, truth_chars = _repo_bounds(trainer.datamodule, pl_module.tokenizer, self.max_new_tokens)
            chosen = repo_prompts(trainer.datamodule.val_sources, self.n_repo_prompts, seed=self.seed,
                                  max_prefix_chars=prefix_chars, max_continuation_chars=truth_chars,
                                  style=line_cut_style(pl_module.tokenizer)) if self.n_repo_prompts else []
            # Shortest truth first: a batch costs as many steps as its longest row, and a row stops once it has
            # its truth's lines, so rows of similar truths stop together.
            self._repo_prompts = sorted(chosen, key=lambda p: len(p.continuation.splitlines()))
            self._fim_prompts = self._choose_fim_prompts(trainer.datamodule, pl_module)
        # Every rank holds the same results (from the same checkpoint), so all take the same branch.
        self._evaluate_unevaluated_epoch(trainer, pl_module)
        if not self.base_eval or self.results["base"] is not None:  # not again when a run resumes
            return
        with pl_module.model.disable_adapter(), torch.random.fork_rng(devices=[]):
            # fork_rng: the validation loader draws a seed from the global RNG (see _evaluate).
            started = perf_counter()
            base_nll = pl_module.held_out_loss()  # on every rank: each computes its share, all get the mean
            held_out_seconds = perf_counter() - started
            # Every rank holds the same figure, so all stop together; a base that overflows learns nothing.
            pl_module.check_finite_base(base_nll)
            if trainer.is_global_zero:
                result = self._evaluate(trainer, pl_module, BASE, base_nll)
                # The base's held-out loss is eval time too (a tuned eval's is Lightning's validation run).
                result["eval_seconds"] = round(result["eval_seconds"] + held_out_seconds, 3)
                self.results["base"] = result
        self._wait_for_rank_zero()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            val_loss = trainer.callback_metrics.get("val/loss")
            self._evaluate_epoch(trainer, pl_module, trainer.current_epoch,
                                 float(val_loss) if val_loss is not None else None)
        self._wait_for_rank_zero()

    def _choose_fim_prompts(self, datamodule: L.LightningDataModule, pl_module: L.LightningModule) -> list[FimPrompt]:
        """The run's FIM prompts, cut where the model's tokenizer cuts lines, shortest truth first (line masks
        before one-line bodies); none without FIM sentinels (the data module already said so) or `fim_prompts` 0."""
        if self._fim_tokens is None or not self.n_fim_prompts:
            return []
        style = line_cut_style(pl_module.tokenizer)
        prefix_chars, suffix_chars = _fim_context_chars(datamodule, pl_module.tokenizer)
        chosen = fim_prompts(datamodule.val_sources, self.n_fim_prompts, seed=self.seed, style=style,
                             max_prefix_chars=prefix_chars, max_suffix_chars=suffix_chars)
        return sorted(chosen, key=lambda p: (p.lines, p.kind == "block"))

    def _evaluate_unevaluated_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from a checkpoint of an epoch's last step (Ctrl-C there, callbacks/interrupt.py) continues
        at the next epoch, so that epoch's end never ran: evaluate it now, its perplexity from the held-out loss
        (its validation run was skipped too)."""
        epoch = trainer.current_epoch - 1
        if self.results["base"] is None or epoch < 0 or any(e["epoch"] >= epoch for e in self.results["epochs"]):
            return
        with torch.random.fork_rng(devices=[]):
            nll = pl_module.held_out_loss()  # on every rank, as for the base
            if trainer.is_global_zero:
                self._evaluate_epoch(trainer, pl_module, epoch, nll)
        self._wait_for_rank_zero()

    def _evaluate_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                        mean_nll: float | None) -> None:
        result = self._evaluate(trainer, pl_module, f"epoch_{epoch}", mean_nll)
        self.results["epochs"].append({"epoch": epoch, "step": trainer.global_step, **result})

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
        started = perf_counter()
        # All of them until the first eval fixed the sets.
        prompts = self._repo_prompts[:self._scored_repo_prompts]
        fim = self._fim_prompts[:self._scored_fim_prompts]
        deadline = None if self.max_seconds is None else started + self.max_seconds
        try:
            completions = self._generate(pl_module, self._requests(prompts, fim), deadline)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; so are cuBLAS/cuDNN allocation failures
            if not is_out_of_memory(err):
                raise
            warnings.warn(f"codetune: the generation eval '{name}' ran out of memory at batch 1 and was skipped; "
                          f"lower --generation.max_new_tokens, --generation.repo_prompts or "
                          f"--generation.fim_prompts.", stacklevel=2)
            return {"metrics": {"perplexity": perplexity(mean_nll)}, "skipped": "out of memory",
                    "eval_seconds": round(perf_counter() - started, 3)}
        repo = completions[:len(prompts)]
        fim_out = completions[len(prompts):len(prompts) + len(fim)]
        language = completions[len(prompts) + len(fim):]
        scored, result = self._settle_prompt_set(name, _PromptCounts(len(prompts), len(fim)),
                                                 _PromptCounts(len(repo), len(fim_out)), len(completions))
        done, fim_done = prompts[:len(repo)], fim[:len(fim_out)]
        metrics = {"perplexity": perplexity(mean_nll),
                   **(completion_metrics(done, repo) if scored.repo else no_completion_metrics()),
                   **(fim_metrics(fim_done, fim_out) if scored.fim else no_fim_metrics())}
        self._write(trainer, name, sample_records(done, repo, self.prompts, language, fim_done, fim_out), metrics)
        return {"metrics": metrics, **result, "eval_seconds": round(perf_counter() - started, 3)}

    def _settle_prompt_set(self, name: str, asked: _PromptCounts, finished: _PromptCounts,
                           done: int) -> tuple[_Scored, dict[str, Any]]:
        """Whether this eval's repo and FIM completions are the run's prompt sets (the first eval makes them so),
        and its `budget_hit` entry when it did not generate all it was asked (`asked` + the language prompts)."""
        fixes_the_set = ((self._scored_repo_prompts is None and finished.repo < asked.repo)
                         or (self._scored_fim_prompts is None and finished.fim < asked.fim))
        if self._scored_repo_prompts is None:
            self._scored_repo_prompts = finished.repo
        if self._scored_fim_prompts is None:  # also the first eval after resuming a checkpoint older than FIM
            self._scored_fim_prompts = finished.fim
        scored = _Scored(finished.repo == self._scored_repo_prompts, finished.fim == self._scored_fim_prompts)
        total = asked.repo + asked.fim + len(self.prompts)
        if done == total:
            return scored, {}
        return scored, {"budget_hit": self._report_budget_hit(name, done, total, fixes_the_set, scored)}

    def _requests(self, prompts: Sequence[RepoPrompt], fim: Sequence[FimPrompt] = ()) -> list[Request]:
        """Repo prompts first (scored: the budget cuts the language samples first), then the FIM prompts
        (scored), then the language ones."""
        sample_cap = min(self.sample_tokens, self.max_new_tokens)
        return ([repo_request(p, self.max_new_tokens, self._header(p.path) if not p.head else "") for p in prompts]
                + [fim_request(p, self._fim_tokens, self._header(p.path), self.max_new_tokens) for p in fim]
                + [language_request(text, sample_cap) for text in self.prompts])

    def _header(self, path: str) -> str:
        """The header a training file starts with (`--data.file_headers`), or nothing."""
        tokens = self._fim_tokens
        return tokens.header(path) if self._file_headers and tokens.file_sep_text else ""

    def _report_budget_hit(self, name: str, done: int, total: int, fixes_the_set: bool,
                           scored: _Scored) -> dict[str, Any]:
        prompt_sets = f"{self._scored_repo_prompts} repo prompts" + (
            f" and {self._scored_fim_prompts} FIM prompts" if self._fim_prompts else "")
        unscored = " and ".join(kind for kind, ok in (("completion", scored.repo), ("FIM", scored.fim)) if not ok)
        if fixes_the_set:
            consequence = (f"; every eval of this run scores the {prompt_sets} it finished, so that base and tuned "
                           f"stay comparable")
        elif unscored:
            consequence = (f"; its {unscored} metrics are not reported, since the run's figures are computed on "
                           f"the {prompt_sets} the first eval finished")
        else:
            consequence = " (the language samples left are not shown)"
        rank_zero_warn(f"codetune: the generation eval '{name}' hit --generation.max_seconds={self.max_seconds}: "
                       f"{done} of {total} prompts generated{consequence}. Raise --generation.max_seconds (or "
                       f"lower --generation.repo_prompts, --generation.fim_prompts or --generation.max_new_tokens) "
                       f"to generate them all.")
        return {"prompts_done": done, "prompts": total, "max_seconds": self.max_seconds}

    def _write(self, trainer: L.Trainer, name: str, samples: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        path = Path(trainer.default_root_dir) / SAMPLES_DIR / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        # The base eval runs at global step 0: its figures are the first point of the tuned curves.
        scalars = {f"eval/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for tag, sample in zip(sample_tags(samples), samples):
                    logger.experiment.add_text(tag, sample_markdown(sample), global_step=trainer.global_step)

    # -- generation --------------------------------------------------------------------------------

    def _generate(self, pl_module: L.LightningModule, requests: list[Request],
                  deadline: float | None = None) -> list[Completion]:
        """A completion per request, in batches that halve on an out-of-memory error; with a `deadline`
        (a `perf_counter` time), no batch starts after it, so the list may be shorter than `requests`."""
        results: list[Completion] = []
        batch_size = self.batch_size
        while len(results) < len(requests):
            if deadline is not None and perf_counter() >= deadline:
                break
            batch = requests[len(results):len(results) + batch_size]
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

    def _generate_batch(self, pl_module: L.LightningModule, requests: list[Request]) -> list[Completion]:
        decoding = Decoding(self.do_sample, self.temperature, self.top_p)
        # Under the trainer's autocast, as in training: the adapters take the 16-bit input as it is.
        return generate_requests(pl_module.model, pl_module.tokenizer, requests, decoding, pl_module.device,
                                 pl_module.trainer.precision_plugin.forward_context())

    # -- manifest and state ------------------------------------------------------------------------

    @property
    def eval_seconds(self) -> float:
        """Seconds spent evaluating in this run, every segment of a resumed one included: the base eval
        (its held-out loss too) and every tuned eval (not Lightning's validation runs)."""
        base = self.results["base"] or {}
        return round(base.get("eval_seconds", 0.0) + sum(e["eval_seconds"] for e in self.results["epochs"]), 3)

    def manifest_phases(self) -> dict[str, dict[str, Any]]:
        """`phase_5_evaluation` for the manifest: base, each epoch, final, delta, eval seconds, budget hits."""
        epochs = self.results["epochs"]
        base_result = self.results["base"] or {}
        base = base_result.get("metrics")
        final = epochs[-1]["metrics"] if epochs else None
        evals = ([(BASE, base_result)] if base_result else []) + [(f"epoch_{e['epoch']}", e) for e in epochs]
        return {"phase_5_evaluation": {
            "base": base,
            "epochs": epochs,
            "final": final,
            "delta": metric_deltas(base, final),
            "eval_seconds": self.eval_seconds,
            "base_eval_seconds": base_result.get("eval_seconds"),
            "repo_prompts": len(self._repo_prompts),
            "repo_prompts_scored": self._scored_repo_prompts,
            "fim_prompts": len(self._fim_prompts),
            "fim_prompts_scored": self._scored_fim_prompts,
            "language_prompts": len(self.prompts),
            "max_new_tokens": self.max_new_tokens,
            "sample_tokens": min(self.sample_tokens, self.max_new_tokens),
            "max_seconds": self.max_seconds,
            "budget_hit": [{"eval": name, **r["budget_hit"]} for name, r in evals if "budget_hit" in r],
        }}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "scored_repo_prompts": self._scored_repo_prompts,
                "scored_fim_prompts": self._scored_fim_prompts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict.get("results", {"base": None, "epochs": []})
        self._scored_repo_prompts = state_dict.get("scored_repo_prompts")
        self._scored_fim_prompts = state_dict.get("scored_fim_prompts")  # absent before the FIM eval: None


def _fim_context_chars(datamodule: L.LightningDataModule, tokenizer: Any) -> tuple[int, int]:
    """Prefix and suffix bounds (characters) of the FIM prompts: an infill request fits a training window, as every
    FIM sample did (half of it prefix, a quarter suffix, the rest for the middle), and at most 1500 + 800 characters."""
    per_token = _chars_per_token(datamodule, tokenizer)
    return (min(FIM_MAX_PREFIX_CHARS, int(datamodule.seq_len * per_token / 2)),
            min(FIM_MAX_SUFFIX_CHARS, int(datamodule.seq_len * per_token / 4)))


def _repo_bounds(datamodule: L.LightningDataModule, tokenizer: Any, max_new_tokens: int) -> tuple[int, int]:
    """Prefix and truth bounds (characters) of the repo prompts. The prompt and its completion fit a training
    window, whose positions are the ones the model learned (at least a quarter of the window for the prompt), and
    at most `REPO_MAX_PREFIX_CHARS`. The truth is at most what `max_new_tokens` can write: more would lower every
    model's chrF alike and only cost scoring time, and at most `REPO_MAX_TRUTH_CHARS`."""
    per_token = _chars_per_token(datamodule, tokenizer)
    tokens = max(datamodule.seq_len // 4, datamodule.seq_len - max_new_tokens)
    return (min(REPO_MAX_PREFIX_CHARS, int(tokens * per_token)),
            min(REPO_MAX_TRUTH_CHARS, int(max_new_tokens * per_token)))


def _chars_per_token(datamodule: L.LightningDataModule, tokenizer: Any) -> float:
    """Characters per token of the held-out files themselves (their first 20,000 characters)."""
    text = "".join(text for _, _, text in datamodule.val_sources)[:20_000]
    return len(text) / max(len(tokenizer(text, add_special_tokens=False)["input_ids"]), 1) if text else 3.0
