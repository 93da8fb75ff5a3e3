"""Pretraining the embedded model from scratch on its corpus, resumable, through codetune's own data module.

The windows are the ones a codetune fit trains on (`codetune.data.CodeDataModule`): the corpus is scanned as one
repository, every file starts with its `<|file_sep|>path` header, and half the pieces are fill-in-the-middle
samples, PSM and SPM, redrawn per epoch. Unlike a codetune fit, every weight trains (there is nothing to adapt
yet). The learning rate warms up, holds, and decays over the last `decay_fraction` of `max_steps`
(warmup-stable-decay), so a run that has not reached its decay can be resumed with a larger `max_steps`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch

from codetune.data.fim import UNIFORM_MIDDLES, MiddleMix
from codetune.model.loss import causal_lm_loss_sum
from codetune.storage import atomic_write_text


def llama_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 dtype: torch.dtype, max_position_embeddings: int = 4096):
    from transformers import LlamaConfig

    from codetune.model.tiny import padded_vocab_size

    return LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype)


class Pretraining(L.LightningModule):
    """Every weight of a fresh Llama, trained on packed windows with AdamW and a warmup-stable-decay schedule."""

    def __init__(self, model_dir: str, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 intermediate_size: int = 768, learning_rate: float = 2e-3, min_lr_ratio: float = 0.05,
                 warmup_steps: int = 100, decay_fraction: float = 0.25, weight_decay: float = 0.1,
                 compile: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoTokenizer, LlamaForCausalLM

        hp = self.hparams
        tokenizer = AutoTokenizer.from_pretrained(hp.model_dir)
        config = llama_config(tokenizer, hp.hidden_size, hp.num_layers, hp.num_heads, hp.intermediate_size,
                              torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.model = LlamaForCausalLM(config)
        if hp.compile:
            self.model.compile()  # in place: the state dict keeps its keys

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # No attention mask and no cache: position ids that restart per file give the block-diagonal mask.
        hidden = self.model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  use_cache=False).last_hidden_state
        total, count = causal_lm_loss_sum(hidden, self.model.get_output_embeddings(), batch["labels"], None)
        return total / count.clamp(min=1)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=hp.learning_rate, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Warmup, hold, then a cosine decay to `min_lr_ratio` over the last `decay_fraction` of the steps."""
        hp = self.hparams
        total = self.trainer.max_steps
        decay_start = int(total * (1 - hp.decay_fraction))
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SessionRecord(L.Callback):
    """Keeps this session's entry in `path` (a JSON list: started, ended, step, max_steps) current at every
    checkpoint and at the end, so a session killed midway still counts up to its last checkpoint."""

    def __init__(self, path: Path, max_steps: int, fim: dict[str, float] | None = None) -> None:
        # Not `self.log`: Lightning gives callbacks a `log` of their own during fit.
        self.path, self.max_steps, self.fim = path, max_steps, fim
        self.earlier = json.loads(path.read_text()) if path.is_file() else []
        self.started = time.time()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.record(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(trainer.global_step)

    def record(self, step: int) -> None:
        entry = {"started": self.started, "ended": time.time(), "step": step, "max_steps": self.max_steps,
                 **({"fim": self.fim} if self.fim else {})}
        atomic_write_text(self.path, json.dumps([*self.earlier, entry], indent=1))


def pretrain(corpus: Path, model_dir: Path, work: Path, max_steps: int, seq_len: int = 512, batch_size: int = 16,
             val_every: int = 250, checkpoint_every: int = 50, threads: int | None = None,
             sessions: Path | None = None, fim_spm_rate: float = 0.5, middles: MiddleMix = UNIFORM_MIDDLES,
             **model_args) -> Path:
    """Train (or resume) until `max_steps`, recording the session's wall time and FIM recipe in `sessions`
    (`SessionRecord`); returns the last checkpoint. FIM is half the pieces, `fim_spm_rate` of them SPM, their
    middles drawn as `middles` says."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from codetune.data.datamodule import CodeDataModule

    if threads:
        torch.set_num_threads(threads)
    data = CodeDataModule(repo=str(corpus), tokenizer=str(model_dir), seq_len=seq_len, batch_size=batch_size,
                          gradient_accumulation_steps=1, extensions=[".rs", ".py"], val_fraction=0.005,
                          max_val_windows=64, fim_rate=0.5, fim_spm_rate=fim_spm_rate, file_headers=True,
                          fim_line_rate=middles.line_rate, fim_block_rate=middles.block_rate,
                          fim_block_lines=middles.block_lines, cache_dir=str(work / "token-cache"), seed=0)
    module = Pretraining(str(model_dir), **model_args)
    recipe = {"spm_rate": fim_spm_rate, **middles._asdict()}
    records = [SessionRecord(sessions, max_steps, recipe)] if sessions else []
    checkpoints = ModelCheckpoint(dirpath=work / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=checkpoint_every)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=max_steps, max_epochs=-1,
                        val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, callbacks=[checkpoints, *records], logger=CSVLogger(work, name="log"),
                        log_every_n_steps=10, default_root_dir=work, enable_model_summary=False)
    last = work / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    return last


def export_model(checkpoint: Path, model_dir: Path, out: Path) -> Path:
    """The checkpoint's weights in 16-bit safetensors with the tokenizer, as a Hugging Face model directory
    `out` (replaced whole: written beside it, then renamed)."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hp = state["hyper_parameters"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = llama_config(tokenizer, hp["hidden_size"], hp["num_layers"], hp["num_heads"], hp["intermediate_size"],
                          torch.float16)
    model = LlamaForCausalLM(config)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to the embeddings
    model.tie_weights()
    model = model.to(torch.float16)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for file in staging.iterdir():  # the weights come out owner-only; a package's files are readable by all
        file.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
