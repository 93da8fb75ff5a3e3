"""Generation samples from language prompts at the end of every training epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from codetune.data.tokens import pad_token_id
from codetune.errors import ConfigError
from codetune.run import atomic_write_text

SAMPLES_DIR = "samples"


class GenerationEval(Callback):
    """Generates a completion for each language prompt at every epoch end, on rank zero.

    Samples go to ``samples/epoch_<n>.jsonl`` in the run directory (one JSON object per prompt:
    ``epoch``, ``step``, ``prompt``, ``completion``, ``new_tokens``) and to TensorBoard as text
    under ``samples/<i>``. Greedy decoding by default, so samples are reproducible.

    Args:
        prompts: Prompts to complete (e.g. ``fn process``, ``impl``, ``#[derive(``).
        max_new_tokens: Tokens generated per prompt (bounds the eval time).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with ``do_sample``).
        top_p: Nucleus sampling threshold (with ``do_sample``).

    Raises:
        ConfigError: on an empty prompt or a non-positive ``max_new_tokens``.

    Example (YAML)::

        generation:
          prompts: ["fn process", "impl"]
          max_new_tokens: 512
    """

    def __init__(self, prompts: list[str] = [], max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 0.8, top_p: float = 0.95) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"--generation.max_new_tokens={max_new_tokens}: must be a positive integer.")
        if any(not p for p in prompts):
            raise ConfigError("--generation.prompts: prompts must be non-empty strings.")
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.prompts:
            return
        samples = [self._sample(pl_module, prompt) for prompt in self.prompts]
        for s in samples:
            s.update(epoch=trainer.current_epoch, step=trainer.global_step)
        path = Path(trainer.default_root_dir) / SAMPLES_DIR / f"epoch_{trainer.current_epoch}.jsonl"
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, s in enumerate(samples):
                    logger.experiment.add_text(f"samples/{i}", _markdown(s), global_step=trainer.global_step)

    @torch.no_grad()
    def _sample(self, pl_module: L.LightningModule, prompt: str) -> dict[str, Any]:
        tokenizer, model = pl_module.tokenizer, pl_module.model
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(pl_module.device)
        was_training = model.training
        model.eval()
        try:
            sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                 pad_token_id=pad_token_id(tokenizer), **sampling)
        finally:
            model.train(was_training)
        new = out[0, ids.shape[1]:]
        return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": int(new.numel())}


def _markdown(sample: dict[str, Any]) -> str:
    # TensorBoard renders text as markdown; a fenced block keeps code indentation.
    return f"```\n{sample['prompt']}{sample['completion']}\n```"
