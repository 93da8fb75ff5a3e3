"""Before/after evaluation: does the tuned model write code more like the repository than the base did?"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table
from transformers import StoppingCriteriaList
from typing_extensions import override

from codetune.memory.backoff import is_out_of_memory
from codetune.eval.report import EVAL_METRICS, RATE_METRICS, delta, format_change, format_value, verdict
from codetune.data.fim import FimTokens, line_cut_style
from codetune.data.tokens import pad_token_id
from codetune.errors import ConfigError
from codetune.eval.metrics import (chrf, mean_next_line_exact_match, perplexity_from_loss, scored_prefix,
                                   syntax_validity_rate)
from codetune.eval.fim import (FimPrompt, fim_chrf, fim_exact_match, fim_prompts, fim_syntax_valid,
                               generated_middle, holds_middle)
from codetune.eval.prompts import RepoPrompt, repo_prompts
from codetune.eval.stopping import CompletionStop, Rule, sample_complete
from codetune.storage import atomic_write_text

SAMPLES_DIR = "samples"
FIM_MAX_PREFIX_CHARS, FIM_MAX_SUFFIX_CHARS = 1500, 800
BASE = "base"
# How long the other ranks wait for rank zero's generations: far above any eval's bounded cost, yet finite if
# rank zero hangs (if it fails, its process exits and the waiting ranks' barrier fails at once).
EVAL_WAIT_TIMEOUT = timedelta(hours=6)
# A line infill stops at its first line; this caps one that never writes a line break (nor EOS).
FIM_LINE_TOKENS = 48


class Request(NamedTuple):
    """One generation: the model input, when its completion is complete, and its token cap."""

    text: str
    rule: Rule
    cap: int


class _PromptCounts(NamedTuple):
    """A number of repo prompts and of FIM prompts (asked, or generated)."""

    repo: int
    fim: int


class _Scored(NamedTuple):
    """Whether an eval's repo and its FIM completions are the run's prompt sets (so are scored)."""

    repo: bool
    fim: bool


class Completion(NamedTuple):
    """What the model wrote for one request: the text, its new tokens (EOS included) and whether it ended
    with EOS (False when it was cut: at its token cap, or stopped once complete)."""

    text: str
    new_tokens: int
    eos: bool


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
      completion parses with tree-sitter. It is judged on the part of the completion the two
      metrics above read (``scored_prefix``), as a cut completion: by the rule in ``syntax_valid``
      (its last two non-blank lines are forgiven). A completion that ended with EOS before that
      part was complete must parse whole; one cut by ``max_new_tokens`` before it is judged as cut.
      A cut completion is only scored when it has more than two non-blank lines, since otherwise
      nothing of it would be judged. None when no completion could be scored.
    - ``fim_exact_match``, ``fim_chrf`` and ``fim_syntax_valid``: from *FIM prompts*, held-out files
      with a line or a function body masked (``codetune/eval/fim.py``), sent as an infill request in
      the tokenizer's own FIM format (prefix, suffix, then the model writes the middle; with the file
      header ``<|file_sep|>path`` first when the training files carry it, ``--data.file_headers``).
      Exact match reads the line masks (the generated line equals the file's, up to trailing
      whitespace), chrF the body masks, and syntax validity every mask of a Rust or Python file that
      parses: the share of those files that still parse, judged whole, with the generated middle in
      the mask. The generated middle is cut to the masked lines (or is all the model wrote before
      EOS). The prefix and suffix are bounded so that a request fits a training window, as every FIM
      training sample did (half the window's characters of prefix, a quarter of suffix, at most 1500
      and 800). None when the tokenizer has no FIM sentinels (the data module says so once), with
      ``fim_prompts`` 0, or when no prompt of the kind was generated.

    The config's language prompts (``fn process``, ``def analyze_``...) are generated too and shown,
    not scored: they have no reference, and whether a keyword appears is not a quality measure.

    **Stopping early.** A repo prompt's generation stops as soon as it holds what its metrics read
    (``codetune.eval.stopping``): the lines through its first non-blank line and as many lines as its
    truth (at most 20), so every score equals the one the full ``max_new_tokens`` completion would get.
    A FIM prompt stops once it holds as many lines as its mask (or at EOS); a line mask's cap is
    ``FIM_LINE_TOKENS`` (48) when ``max_new_tokens`` is more. A language sample stops at a blank line
    after its first block closed, at EOS, or at ``sample_tokens``. ``max_new_tokens`` stays the cap of
    every generation. A batch runs until its last row stops, so the repo prompts, then the FIM
    prompts, are generated in the order of their truth's length, shortest first (ties by path and
    line): rows that stop at similar steps share a batch.

    **Budget.** With ``max_seconds``, an eval's generation stops starting batches once that many
    seconds have passed since it began (a batch already running finishes, so an eval may overrun by
    one batch); the prompts left are not generated, and a warning naming the flag says how many were
    done. Repo prompts go first, then the FIM prompts, then the language samples, so the budget drops
    the language samples first, then the FIM prompts, then the longest repo truths. The first eval
    that generates (the base one, unless ``base_eval`` is off) fixes the repo and FIM
    prompts of the run: the ones it finished are the ones every later eval generates and scores, so
    base and tuned figures are always computed on the same prompts (the counts are in the checkpoint,
    so a resumed run keeps them; a checkpoint older than the FIM eval fixes its FIM set at the next
    eval). A later eval that cannot finish a set reports none of that set's metrics (the completion
    or the FIM ones) rather than figures on a different set.

    Output: ``samples/base.jsonl`` and ``samples/epoch_<n>.jsonl`` (one JSON object per prompt:
    ``kind`` repo/fim/language, ``prompt`` or ``path``/``line``, ``completion``, ``truth``,
    ``new_tokens``, ``eos``; a FIM sample also has ``mask`` line/block, ``prefix_tail`` and
    ``suffix_head``). TensorBoard: scalars ``eval/<metric>`` and one text tag per prompt,
    ``samples/repo_<i>``, ``samples/fim_<i>`` and ``samples/language_<i>`` (``i`` its index, stable
    for the run), all at the global step of the eval: the base is step 0 of the same curves, and the
    step slider of a sample tag steps through that prompt's completions. The manifest's ``phase_5_evaluation``:
    ``base``, ``epochs`` (metrics, eval seconds and any ``budget_hit`` of each), ``final``,
    ``delta`` (final - base), ``eval_seconds`` (all evals, the base's held-out loss included),
    ``base_eval_seconds``, ``repo_prompts``, ``repo_prompts_scored``, ``fim_prompts``,
    ``fim_prompts_scored`` and ``budget_hit`` (one entry per eval that hit the budget: ``eval``,
    ``prompts_done``, ``prompts``). At the end of training a table prints base -> tuned with the change.

    Cost is bounded: at most ``repo_prompts`` + ``fim_prompts`` + ``len(prompts)`` generations per
    eval, of at most ``max_new_tokens`` (repo prompts, FIM bodies), 48 (FIM lines) or ``sample_tokens``
    (language) tokens each, in batches of ``batch_size`` (left-padded), within ``max_seconds`` when
    set; an out-of-memory error halves the batch and retries, and at batch 1 the eval of that epoch is
    skipped with a warning (recorded in the manifest) rather than ending the run. cuBLAS and cuDNN workspace
    allocation failures count as out of memory (``codetune.memory.backoff.is_out_of_memory``); any other
    error ends the run.

    Under DDP every rank computes its share of the base model's held-out loss (one collective), then
    rank zero alone generates while the other ranks wait in a barrier of a separate gloo process group
    created in ``setup``, whose timeout (``EVAL_WAIT_TIMEOUT``, 6 h) is not the training group's: no
    collective of the training group is pending meanwhile, so an eval longer than that group's timeout
    (``--trainer.strategy`` ``init_args.timeout``, 30 min by default) does not crash the other ranks.

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
        self._file_headers = False  # whether the training files (so the FIM requests) start with a file header
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
            chosen = repo_prompts(trainer.datamodule.val_sources, self.n_repo_prompts,
                                  seed=self.seed) if self.n_repo_prompts else []
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
            getattr(pl_module, "check_finite_base", lambda nll: None)(base_nll)
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
        # getattr: a data module other than CodeDataModule (a test's) offers no FIM sentinels.
        self._fim_tokens = getattr(datamodule, "fim_tokens", None)
        if self._fim_tokens is None or not self.n_fim_prompts:
            return []
        # getattr: a data module from before file headers existed trains on files without one.
        self._file_headers = bool(getattr(datamodule.hparams, "file_headers", False))
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
            return {"metrics": {"perplexity": _perplexity(mean_nll)}, "skipped": "out of memory",
                    "eval_seconds": round(perf_counter() - started, 3)}
        repo = completions[:len(prompts)]
        fim_out = completions[len(prompts):len(prompts) + len(fim)]
        language = completions[len(prompts) + len(fim):]
        scored, result = self._settle_prompt_set(name, _PromptCounts(len(prompts), len(fim)),
                                                 _PromptCounts(len(repo), len(fim_out)), len(completions))
        done, fim_done = prompts[:len(repo)], fim[:len(fim_out)]
        metrics = {"perplexity": _perplexity(mean_nll),
                   **(self._completion_metrics(done, repo) if scored.repo else _no_completion_metrics()),
                   **(_fim_metrics(fim_done, fim_out) if scored.fim else _no_fim_metrics())}
        self._write(trainer, name, self._samples(done, repo, language, fim_done, fim_out), metrics)
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

    def _requests(self, prompts: list[RepoPrompt], fim: Sequence[FimPrompt] = ()) -> list[Request]:
        """Repo prompts first (scored: the budget cuts the language samples first), then the FIM prompts
        (scored), then the language ones."""
        sample_cap = min(self.sample_tokens, self.max_new_tokens)
        return ([Request(p.model_input, partial(_holds_scored_prefix, truth=p.continuation), self.max_new_tokens)
                 for p in prompts]
                + [self._fim_request(p) for p in fim]
                + [Request(text, sample_complete, sample_cap) for text in self.prompts])

    def _fim_request(self, prompt: FimPrompt) -> Request:
        """An infill request in the tokenizer's FIM format, headed like the training files; it stops once it
        holds the masked lines (a line mask, at a smaller cap: a line is short)."""
        tokens = self._fim_tokens
        header = tokens.header(prompt.path) if self._file_headers and tokens.file_sep_text else ""
        cap = min(self.max_new_tokens, FIM_LINE_TOKENS) if prompt.kind == "line" else self.max_new_tokens
        return Request(tokens.psm_prompt(prompt.prefix, prompt.suffix, header),
                       partial(holds_middle, truth=prompt.middle), cap)

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

    def _completion_metrics(self, prompts: list[RepoPrompt], completions: list[Completion]) -> dict[str, float | None]:
        if not completions:
            return _no_completion_metrics()
        generated = [c.text for c in completions]
        truths = [p.continuation for p in prompts]
        judged = [_judged_for_syntax(c, p.continuation) for p, c in zip(prompts, completions)]
        syntax = syntax_validity_rate((p.program(text), p.language, cut)
                                      for p, (text, cut) in zip(prompts, judged) if _syntax_scorable(text, cut))
        return {"next_line_exact_match": mean_next_line_exact_match(generated, truths),
                "chrf": chrf(generated, truths), "syntax_valid": syntax}

    def _samples(self, prompts: list[RepoPrompt], repo: list[Completion], language: list[Completion],
                 fim: Sequence[FimPrompt] = (), fim_out: Sequence[Completion] = ()) -> list[dict[str, Any]]:
        samples = [{"kind": "repo", "path": p.path, "line": p.line, "prompt_tail": p.model_input[-200:],
                    "completion": c.text, "truth": p.continuation, "new_tokens": c.new_tokens, "eos": c.eos}
                   for p, c in zip(prompts, repo)]
        samples += [{"kind": "fim", "path": p.path, "line": p.line, "mask": p.kind, "prefix_tail": p.prefix[-200:],
                     "suffix_head": p.suffix[:200], "completion": c.text, "truth": p.middle,
                     "new_tokens": c.new_tokens, "eos": c.eos}
                    for p, c in zip(fim, fim_out)]
        samples += [{"kind": "language", "prompt": prompt, "completion": c.text, "new_tokens": c.new_tokens,
                     "eos": c.eos}
                    for prompt, c in zip(self.prompts, language)]
        return samples

    def _write(self, trainer: L.Trainer, name: str, samples: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        path = Path(trainer.default_root_dir) / SAMPLES_DIR / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        # The base eval runs at global step 0: its figures are the first point of the tuned curves.
        scalars = {f"eval/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for tag, sample in zip(sample_tags(samples), samples):
                    logger.experiment.add_text(tag, _markdown(sample), global_step=trainer.global_step)

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

    @torch.no_grad()
    def _generate_batch(self, pl_module: L.LightningModule, requests: list[Request]) -> list[Completion]:
        tokenizer, model = pl_module.tokenizer, pl_module.model
        rows = tokenizer([r.text for r in requests], add_special_tokens=False)["input_ids"]
        ids, mask = _left_padded(rows, pad_token_id(tokenizer))
        ids, mask = ids.to(pl_module.device), mask.to(pl_module.device)
        stop = CompletionStop(tokenizer, ids.shape[1], [r.rule for r in requests], [r.cap for r in requests])
        was_training = model.training
        model.eval()
        try:
            sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
            # Under the trainer's autocast, as in training: the adapters take the 16-bit input as it is.
            with pl_module.trainer.precision_plugin.forward_context():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(stop.caps),
                                     stopping_criteria=StoppingCriteriaList([stop]), do_sample=self.do_sample,
                                     pad_token_id=pad_token_id(tokenizer), **sampling)
        finally:
            model.train(was_training)
        return [_completion(tokenizer, row, stopped_at)
                for row, stopped_at in zip(out[:, ids.shape[1]:], stop.stopped_at)]

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
            "delta": _delta(base, final),
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


def comparison_table(phase: dict[str, Any]) -> Table:
    """Rich table: metric, base, tuned, change (with whether the change is an improvement)."""
    table = Table(title="Evaluation on held-out files: base -> tuned", title_justify="left")
    for name, justify in (("metric", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    base, final = phase["base"] or {}, phase["final"] or {}
    for key, label, better in EVAL_METRICS:
        b, f = base.get(key), final.get(key)
        rate = key in RATE_METRICS
        table.add_row(label, format_value(b, rate=rate), format_value(f, rate=rate),
                      change_cell(delta(f, b), better, rate=rate))
    return table


def change_cell(change: float | None, better: str, rate: bool = False) -> str:
    """The change, green when it is an improvement in a metric whose `better` direction is given; a `rate`
    (0..1) with three decimals, as its values are shown."""
    if change is None:
        return ""
    text = format_change(change, rate=rate)
    if change == 0:
        return text
    return f"[{'green' if verdict(change, better) == 'better' else 'red'}]{text}[/]"


def sample_tags(samples: list[dict[str, Any]]) -> list[str]:
    """One TensorBoard tag per prompt, the same in every eval: `samples/repo_03`, `samples/fim_00`,
    `samples/language_01`."""
    counts = {"repo": 0, "fim": 0, "language": 0}
    tags = []
    for sample in samples:
        tags.append(f"samples/{sample['kind']}_{counts[sample['kind']]:02d}")
        counts[sample["kind"]] += 1
    return tags


def _holds_scored_prefix(text: str, truth: str) -> bool:
    return scored_prefix(text, truth) is not None


def _judged_for_syntax(completion: Completion, truth: str) -> tuple[str, bool]:
    """(text, cut) that syntax validity judges: the scored prefix, a cut text, once the completion holds it
    (whether generation went on past it or not); otherwise the whole completion, cut unless it ended with EOS."""
    prefix = scored_prefix(completion.text, truth)
    return (prefix, True) if prefix is not None else (completion.text, not completion.eos)


def _completion(tokenizer: Any, row: torch.Tensor, stopped_at: int | None) -> Completion:
    """One generated row (new tokens only, padded once done): its text up to where it ended."""
    eos = tokenizer.eos_token_id
    ends = (row == eos).nonzero() if stopped_at is None and eos is not None else row[:0]
    length = stopped_at if stopped_at is not None else int(ends[0]) + 1 if len(ends) else len(row)
    return Completion(tokenizer.decode(row[:length], skip_special_tokens=True), length, len(ends) > 0)


def _no_completion_metrics() -> dict[str, None]:
    return {"next_line_exact_match": None, "chrf": None, "syntax_valid": None}


def _fim_context_chars(datamodule: L.LightningDataModule, tokenizer: Any) -> tuple[int, int]:
    """Prefix and suffix bounds (characters) of the FIM prompts: an infill request fits a training window, as every
    FIM sample did (half of it prefix, a quarter suffix, the rest for the middle), and at most 1500 + 800 characters.
    Characters per token are measured on the held-out files themselves."""
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is None:
        return FIM_MAX_PREFIX_CHARS, FIM_MAX_SUFFIX_CHARS
    text = "".join(text for _, _, text in datamodule.val_sources)[:20_000]
    per_token = len(text) / max(len(tokenizer(text, add_special_tokens=False)["input_ids"]), 1) if text else 3.0
    return (min(FIM_MAX_PREFIX_CHARS, int(seq_len * per_token / 2)),
            min(FIM_MAX_SUFFIX_CHARS, int(seq_len * per_token / 4)))


def _fim_metrics(prompts: list[FimPrompt], completions: list[Completion]) -> dict[str, float | None]:
    """The FIM metrics of the generated middles: each completion cut to its mask's lines (or whole, when it
    ended or hit its cap first)."""
    middles = [generated_middle(c.text, p.middle) for p, c in zip(prompts, completions)]
    return {"fim_exact_match": fim_exact_match(prompts, middles), "fim_chrf": fim_chrf(prompts, middles),
            "fim_syntax_valid": fim_syntax_valid(prompts, middles)}


def _no_fim_metrics() -> dict[str, None]:
    return {"fim_exact_match": None, "fim_chrf": None, "fim_syntax_valid": None}


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
    if sample["kind"] == "fim":
        return (f"`{sample['path']}:{sample['line']}` ({sample['mask']} infill)\n\n```\n...{sample['prefix_tail']}\n```"
                f"\n\ngenerated:\n\n```\n{sample['completion']}\n```\n\ntruth:\n\n```\n{sample['truth']}\n```"
                f"\n\nthen:\n\n```\n{sample['suffix_head']}...\n```")
    return f"```\n{sample['prompt']}{sample['completion']}\n```"
