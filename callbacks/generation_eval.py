"""Before/after evaluation: does the tuned model write code more like the repository than the base did?"""

from __future__ import annotations

import json
import math
import warnings
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

from codetune.backoff import is_out_of_memory
from codetune.compare import EVAL_METRICS, RATE_METRICS, delta, format_change, format_value, verdict
from codetune.data.tokens import pad_token_id
from codetune.errors import ConfigError
from codetune.eval.metrics import (chrf, mean_next_line_exact_match, perplexity_from_loss, scored_prefix,
                                   syntax_validity_rate)
from codetune.eval.prompts import RepoPrompt, repo_prompts
from codetune.eval.stopping import CompletionStop, Rule, sample_complete
from codetune.run import atomic_write_text

SAMPLES_DIR = "samples"
BASE = "base"
# How long the other ranks wait for rank zero's generations: far above any eval's bounded cost, yet finite if
# rank zero hangs (if it fails, its process exits and the waiting ranks' barrier fails at once).
EVAL_WAIT_TIMEOUT = timedelta(hours=6)


class Request(NamedTuple):
    """One generation: the model input, when its completion is complete, and its token cap."""

    text: str
    rule: Rule
    cap: int


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

    The config's language prompts (``fn process``, ``def analyze_``...) are generated too and shown,
    not scored: they have no reference, and whether a keyword appears is not a quality measure.

    **Stopping early.** A repo prompt's generation stops as soon as it holds what its metrics read
    (``codetune.eval.stopping``): the lines through its first non-blank line and as many lines as its
    truth (at most 20), so every score equals the one the full ``max_new_tokens`` completion would get.
    A language sample stops at a blank line after its first block closed, at EOS, or at
    ``sample_tokens``. ``max_new_tokens`` stays the cap of every generation. A batch runs until its
    last row stops, so repo prompts are generated in the order of their truth's length, shortest
    first (ties by path and line): rows that stop at similar steps share a batch.

    **Budget.** With ``max_seconds``, an eval's generation stops starting batches once that many
    seconds have passed since it began (a batch already running finishes, so an eval may overrun by
    one batch); the prompts left are not generated, and a warning naming the flag says how many were
    done (the budget thus drops the longest truths first, then the language samples). The first eval
    that generates (the base one, unless ``base_eval`` is off) fixes the repo
    prompts of the run: the ones it finished are the ones every later eval generates and scores, so
    base and tuned figures are always computed on the same prompts (the count is in the checkpoint,
    so a resumed run keeps it). A later eval that cannot finish that set reports no completion
    metrics (only perplexity) rather than figures on a different set.

    Output: ``samples/base.jsonl`` and ``samples/epoch_<n>.jsonl`` (one JSON object per prompt:
    ``kind`` language/repo, ``prompt`` or ``path``/``line``, ``completion``, ``truth``,
    ``new_tokens``, ``eos``). TensorBoard: scalars ``eval/<metric>`` and one text tag per prompt,
    ``samples/repo_<i>`` and ``samples/language_<i>`` (``i`` its index, stable for the run), all at
    the global step of the eval: the base is step 0 of the same curves, and the step slider of a
    sample tag steps through that prompt's completions. The manifest's ``phase_5_evaluation``:
    ``base``, ``epochs`` (metrics, eval seconds and any ``budget_hit`` of each), ``final``,
    ``delta`` (final - base), ``eval_seconds`` (all evals, the base's held-out loss included),
    ``base_eval_seconds``, ``repo_prompts_scored`` and ``budget_hit`` (one entry per eval that hit
    the budget: ``eval``, ``prompts_done``, ``prompts``). At the end of training a table prints
    base -> tuned with the change.

    Cost is bounded: at most ``repo_prompts`` + ``len(prompts)`` generations per eval, of at most
    ``max_new_tokens`` (repo) or ``sample_tokens`` (language) each, in batches of ``batch_size``
    (left-padded), within ``max_seconds`` when set; an out-of-memory
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
        max_new_tokens: Most tokens generated per prompt (a repo prompt stops earlier once it holds what
            its metrics read).
        sample_tokens: Most tokens generated per language prompt (shown, not scored); at most
            ``max_new_tokens`` are generated whatever this says.
        max_seconds: Wall-clock budget of each eval's generation, in seconds (None: no budget). No batch starts
            after it; the prompts left are reported, and the repo prompts the first eval finished are the ones
            every eval of the run scores.
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
          sample_tokens: 64
          max_seconds: 120
          repo_prompts: 16

    Raises:
        ConfigError: a setting is out of range (every problem named by its flag, in one message).
    """

    def __init__(self, prompts: list[str] = [], max_new_tokens: int = 256, sample_tokens: int = 64,
                 max_seconds: float | None = None, repo_prompts: int = 16, batch_size: int = 8,
                 base_eval: bool = True, do_sample: bool = False, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0) -> None:
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
        if batch_size < 1:
            problems.append(f"--generation.batch_size={batch_size}: must be a positive integer")
        if problems:
            raise ConfigError("; ".join(problems))
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.sample_tokens = sample_tokens
        self.max_seconds = max_seconds
        self.n_repo_prompts = repo_prompts
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
        # Every rank holds the same results (from the same checkpoint), so all take the same branch.
        self._evaluate_unevaluated_epoch(trainer, pl_module)
        if not self.base_eval or self.results["base"] is not None:  # not again when a run resumes
            return
        with pl_module.model.disable_adapter(), torch.random.fork_rng(devices=[]):
            # fork_rng: the validation loader draws a seed from the global RNG (see _evaluate).
            started = perf_counter()
            base_nll = pl_module.held_out_loss()  # on every rank: each computes its share, all get the mean
            held_out_seconds = perf_counter() - started
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
        prompts = self._repo_prompts[:self._scored_repo_prompts]  # all of them until the first eval fixed the set
        deadline = None if self.max_seconds is None else started + self.max_seconds
        try:
            completions = self._generate(pl_module, self._requests(prompts), deadline)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; so are cuBLAS/cuDNN allocation failures
            if not is_out_of_memory(err):
                raise
            warnings.warn(f"codetune: the generation eval '{name}' ran out of memory at batch 1 and was skipped; "
                          f"lower --generation.max_new_tokens or --generation.repo_prompts.", stacklevel=2)
            return {"metrics": {"perplexity": _perplexity(mean_nll)}, "skipped": "out of memory",
                    "eval_seconds": round(perf_counter() - started, 3)}
        repo, language = completions[:len(prompts)], completions[len(prompts):]
        scored, result = self._settle_prompt_set(name, len(prompts), len(repo), len(completions))
        done = prompts[:len(repo)]
        metrics = {"perplexity": _perplexity(mean_nll),
                   **(self._completion_metrics(done, repo) if scored else _no_completion_metrics())}
        self._write(trainer, name, self._samples(done, repo, language), metrics)
        return {"metrics": metrics, **result, "eval_seconds": round(perf_counter() - started, 3)}

    def _settle_prompt_set(self, name: str, asked: int, repo_done: int, done: int) -> tuple[bool, dict[str, Any]]:
        """Whether this eval's repo completions are the run's prompt set (the first eval makes them so), and
        its `budget_hit` entry when it did not generate all it was asked (`asked` repo prompts + the language ones)."""
        fixes_the_set = self._scored_repo_prompts is None and repo_done < asked
        if self._scored_repo_prompts is None:
            self._scored_repo_prompts = repo_done
        scored = repo_done == self._scored_repo_prompts
        total = asked + len(self.prompts)
        if done == total:
            return scored, {}
        return scored, {"budget_hit": self._report_budget_hit(name, done, total, fixes_the_set, scored)}

    def _requests(self, prompts: list[RepoPrompt]) -> list[Request]:
        """Repo prompts first (scored: the budget cuts the language samples first), then the language ones."""
        sample_cap = min(self.sample_tokens, self.max_new_tokens)
        return ([Request(p.model_input, partial(_holds_scored_prefix, truth=p.continuation), self.max_new_tokens)
                 for p in prompts]
                + [Request(text, sample_complete, sample_cap) for text in self.prompts])

    def _report_budget_hit(self, name: str, done: int, total: int, fixes_the_set: bool,
                           scored: bool) -> dict[str, Any]:
        if fixes_the_set:
            consequence = (f"; every eval of this run scores the {self._scored_repo_prompts} repo prompts it "
                           f"finished, so that base and tuned stay comparable")
        elif not scored:
            consequence = (f"; its completion metrics are not reported, since the run's figures are computed on "
                           f"the {self._scored_repo_prompts} repo prompts the first eval finished")
        else:
            consequence = " (the language samples left are not shown)"
        rank_zero_warn(f"codetune: the generation eval '{name}' hit --generation.max_seconds={self.max_seconds}: "
                       f"{done} of {total} prompts generated{consequence}. Raise --generation.max_seconds (or "
                       f"lower --generation.repo_prompts or --generation.max_new_tokens) to generate them all.")
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

    def _samples(self, prompts: list[RepoPrompt], repo: list[Completion],
                 language: list[Completion]) -> list[dict[str, Any]]:
        samples = [{"kind": "repo", "path": p.path, "line": p.line, "prompt_tail": p.model_input[-200:],
                    "completion": c.text, "truth": p.continuation, "new_tokens": c.new_tokens, "eos": c.eos}
                   for p, c in zip(prompts, repo)]
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
            "language_prompts": len(self.prompts),
            "max_new_tokens": self.max_new_tokens,
            "sample_tokens": min(self.sample_tokens, self.max_new_tokens),
            "max_seconds": self.max_seconds,
            "budget_hit": [{"eval": name, **r["budget_hit"]} for name, r in evals if "budget_hit" in r],
        }}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "scored_repo_prompts": self._scored_repo_prompts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict.get("results", {"base": None, "epochs": []})
        self._scored_repo_prompts = state_dict.get("scored_repo_prompts")


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
    """One TensorBoard tag per prompt, the same in every eval: `samples/repo_03`, `samples/language_01`."""
    counts = {"repo": 0, "language": 0}
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
