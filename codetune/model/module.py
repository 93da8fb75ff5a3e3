"""The LightningModule: a causal LM (4-bit NF4 on CUDA) with LoRA adapters, trained on packed windows.

Optimization is manual so that one optimizer step is one place in the code: each batch is a whole
optimizer batch (micro-batch x accumulation windows), and `codetune.model.step.StepNumerics`, the one
owner of the micro-batch, cuts it into micro-batches, divides every micro-batch's summed loss by the
whole batch's target count (all ranks' under DDP), redoes the batch at half the micro-batch after an
OOM and sums the gradients over ranks. The loss never materialises [batch, seq, vocab] logits at
once: see `codetune.model.loss`.

Precision: 16-bit compute always runs under Lightning's autocast (`bf16-mixed`, or `16-mixed` with a
GradScaler), with the LoRA weights in fp32 and taking the 16-bit input as it is. The precision plugin
unscales the gradients inside `optimizer.step()` and then calls `on_before_optimizer_step`; that hook
computes the gradient norm, lets every rank vote that the loss and the norm are finite, and clips. If
a vote fails, the run stops (`NonFiniteLossError`) before the update, so the weights and every
checkpoint stay the last finite ones; under a GradScaler an infinite gradient is instead a skipped
step (counted). A resume at a new --model.learning_rate rescales the restored schedule to it.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from codetune.errors import ConfigError, NonFiniteActivationsError, NonFiniteLossError, NonFiniteWeightsError
from codetune.memory.checks import lora_dropout_problems, lora_rank_problems, loss_chunk_problems, micro_batch_problems
from codetune.memory.fit_plan import plan_fit, smallest_free_memory
from codetune.memory.ram import available_ram_bytes
from codetune.memory.shapes import DEFAULT_LORA_TARGETS, TrainingShape, training_shape_for
from codetune.model.attention import dtype_name
from codetune.model.float16 import (DEFAULT_RESIDUAL_SCALE, ResidualScaling, check_residual_scale,
                                    first_non_finite_layer, scale_residual_stream)
from codetune.model.kernels import AttentionPlan, attention_plan
from codetune.model.loading import (DType, Quantization, apply_lora, check_context,
                                    check_precision, cuda_capability, enable_gradient_checkpointing,
                                    keep_adapter_input_dtype, load_causal_lm, quiet_weight_bars, resolve_dtype,
                                    resolve_quantization)
from codetune.model.loss import causal_lm_loss_sum
from codetune.model.messages import (full_layers_fix, last_checkpoint, non_finite_base_message,
                                     non_finite_step_message, precision_fixes)
from codetune.model.resume import check_restores_every_trainable_tensor, rescale_learning_rate
from codetune.model.step import (StepNumerics, disable_ddp_backward_sync, flash_attention, grad_norm_vote, one_row,
                                 stepped_parameters, step_optimizer, sum_over_ranks)
from codetune.data.model_source import EMBEDDED_NAME, check_model_source
from codetune.model.revision import base_revision, check_same_base, pinned_revision
from codetune.model.optim import OptimizerName, build_optimizer, resolve_optimizer
from codetune.data.tokenizer import TINY_NAME
from codetune.model.tiny import build_tiny_model
from codetune.storage import BASE_MODEL_DIR, atomic_save_dir


class CodeLoRAModule(L.LightningModule):
    """QLoRA fine-tuning of a causal code LM.

    Args:
        name_or_path: Base model: a Hugging Face id (e.g. Qwen/Qwen2.5-Coder-1.5B), a local
            directory, 'embedded' (the default: a small Llama pretrained on permissive Rust and Python code,
            shipped with codetune, codetune/embedded/README.md), or 'tiny' (a randomly initialised Llama built
            from a config, saved to the run's base_model/).
        quantization: 'nf4' loads the base in 4-bit NF4 (bitsandbytes); 'none' in `dtype`; 'auto'
            is nf4 on CUDA and none elsewhere (with a warning).
        dtype: Compute dtype of the base model; 'auto' is bf16 on CUDA from compute capability 8.0 (Ampere),
            fp16 below it (Turing: no native bf16), fp32 on CPU. --trainer.precision follows it (bf16-mixed,
            16-mixed with a GradScaler, 32-true) unless given; a pair that disagrees is an error.
        trust_remote_code: Allow model code from the hub repository (off unless you trust it).
        revision: Hub revision (branch, tag or commit) of a hub base; the commit it resolves to is recorded
            (`base_revision`, in the manifest and checkpoints), and a resume must find the same base.
        attn_implementation: transformers attention backend ('sdpa', 'eager', 'flash_attention_2'; with flash
            attention each micro-batch runs as one row of packed windows, its varlen path).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA path. Off by default: with it every adapter keeps a mask and a copy of
            its input (the Rust config would not fit 6 GiB) and trains ~31% slower, and on the demo it never
            learned better (held-out perplexity 31.4 vs 31.5, 31.7 vs 31.7, 42.2 vs 246 over three seeds).
        lora_target_modules: Names of the linear layers that get adapters.
        modules_to_save: Layers trained in full and saved with the adapter (peft's
            `modules_to_save`), e.g. [embed_tokens, lm_head] for the randomly initialised 'tiny'
            model, whose frozen random embeddings LoRA alone can barely adapt to. Empty for a
            pretrained base.
        gradient_checkpointing: Recompute activations in backward to save memory (about a third more compute):
            true, false, or 'auto': on exactly when the VRAM plan does not fit the card's free memory without
            it (off on CPU, where there is no card to fit).
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay on the LoRA weights.
        warmup_steps: Linear warm-up optimizer steps before the cosine decay.
        max_grad_norm: Gradient clipping by global norm (0 disables it).
        optimizer: 'auto' (bitsandbytes' 8-bit AdamW, 'adamw_8bit', for a 4-bit base on CUDA; torch's AdamW
            otherwise), 'adamw', 'adamw_8bit' (about a quarter of AdamW's state) or 'paged_adamw_8bit' (the same
            bytes; the states of tensors of 100,000+ values in CUDA managed memory, which torch's memory
            statistics do not count); see codetune/model/optim.py.
        loss_chunk_size: Tokens per chunk of the output projection + cross-entropy (None: plain path).
        seq_len: Window length (linked from --data.seq_len).
        micro_batch_size: Windows per forward/backward (linked from --data.batch_size); 'auto' picks the
            largest that the VRAM plan fits in the card's free memory (the whole batch on CPU). Under DDP both
            'auto' choices are made once for all ranks, for the card with the least free memory.
        seed: Seed of the tiny model's initialisation.
        float16_residual_scale: In float16 only (what `auto` trains in below compute capability 8.0, e.g. an RTX
            2060): the residual stream runs scaled by 1/N so that Qwen2-family activations, which reach 1e5, stay
            inside float16's 65504 (codetune/model/float16.py). Exact: logits and gradients are unchanged, and
            nothing more is kept for backward. A power of two; 1 turns it off.
    """

    def __init__(
        self,
        name_or_path: str = EMBEDDED_NAME,
        quantization: Quantization = "auto",
        dtype: DType = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        attn_implementation: str = "sdpa",
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] = list(DEFAULT_LORA_TARGETS),
        modules_to_save: list[str] = [],
        gradient_checkpointing: bool | Literal["auto"] = "auto",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        max_grad_norm: float = 1.0,
        optimizer: OptimizerName = "auto",
        loss_chunk_size: int | None = 1024,
        seq_len: int = 2048,
        micro_batch_size: int | Literal["auto"] = 8,
        seed: int = 0,
        float16_residual_scale: int = DEFAULT_RESIDUAL_SCALE,
    ) -> None:
        super().__init__()
        _validate(lora_rank, lora_alpha, lora_dropout, learning_rate, warmup_steps, micro_batch_size, loss_chunk_size)
        check_residual_scale(float16_residual_scale)
        if name_or_path != TINY_NAME:
            check_model_source(name_or_path, "--model.name_or_path")
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base is rebuilt on load.
        self.strict_loading = False
        # The micro-batch, its back-offs and the step's arithmetic (codetune/model/step.py); checkpointed.
        self.numerics = StepNumerics(micro_batch_size)
        self.optimizer_name: str | None = None  # resolved in configure_model, once the device is known
        self.vram_plan: dict[str, Any] | None = None
        # The attention kernels of each kind of micro-batch on this device (codetune/model/kernels.py).
        self.attention_plan: AttentionPlan | None = None
        # The compute dtype and the card's compute capability (None off CUDA), resolved in configure_model.
        self.compute_dtype: torch.dtype | None = None
        self.capability: tuple[int, int] | None = None
        # The float16 residual-stream scaling in force (codetune/model/float16.py), None when not float16.
        self.float16_scaling: ResidualScaling | None = None
        # Which base this run trains on (codetune/model/revision.py); set in configure_model.
        self.base_revision: dict[str, Any] | None = None
        # Optimizer steps a float16 GradScaler skipped (inf/nan gradients after unscaling); checkpointed.
        self.skipped_steps = 0
        self._step_loss: torch.Tensor | None = None
        self._grad_norm_value = math.nan
        self.model = None
        self.tokenizer = None
        self.val_loss = MeanMetric()

    @property
    def micro_batch_size(self) -> int | Literal["auto"]:
        """Windows per forward/backward now: the step's (`numerics`), after the plan and any OOM back-off."""
        return self.numerics.micro_batch_size

    # -- model ---------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.tokenizer = self.trainer.datamodule.tokenizer
        device = self.trainer.strategy.root_device
        cuda = device.type == "cuda"
        source = self._tiny_base_dir() if hp.name_or_path == TINY_NAME else hp.name_or_path
        quantize = resolve_quantization(hp.quantization, cuda)
        self.optimizer_name = resolve_optimizer(hp.optimizer, quantize, cuda)
        self.capability = cuda_capability(device) if cuda else None
        dtype = self.compute_dtype = resolve_dtype(hp.dtype, device.type, self.capability)
        self._check_precision(dtype)
        self.base_revision = self._resolve_base(source)
        model = load_causal_lm(source, quantize, dtype, hp.trust_remote_code, hp.attn_implementation, device,
                               revision=pinned_revision(self.base_revision))
        check_context(self.hparams.seq_len, model.config)
        self.attention_plan = self._attention_plan(model.config, dtype)
        self.model = apply_lora(model, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules,
                                hp.modules_to_save)
        # Under autocast the adapters take the 16-bit input as it is: peft's cast to the fp32 LoRA dtype would keep
        # an fp32 copy of every adapted layer's input for backward (half the step's memory at 8 x 2048).
        keep_adapter_input_dtype(self.model)
        if dtype == torch.float16 and hp.float16_residual_scale > 1:
            self.float16_scaling = scale_residual_stream(self.model, hp.float16_residual_scale)
            rank_zero_info(f"codetune float16: the residual stream runs scaled by 1/{hp.float16_residual_scale} "
                           f"(--model.float16_residual_scale), {self.float16_scaling.hooks} hooks")
        trainable, total = self.model.get_nb_trainable_parameters()
        rank_zero_info(f"codetune model: {hp.name_or_path}, {trainable:,} trainable of {total:,} parameters")
        # Planned with the weights on the card; checkpointing (possibly chosen by the plan) is turned on after.
        self.vram_plan, checkpointing = self._plan_memory(model.config, quantize, dtype, device)
        if checkpointing:
            enable_gradient_checkpointing(model)

    def precision_fixes(self) -> list[str]:
        """`precision_fixes` for this run's dtype, card and settings."""
        hp = self.hparams
        return precision_fixes(self.compute_dtype, self.capability, hp.float16_residual_scale, hp.attn_implementation)

    def check_finite_base(self, nll: float | None) -> None:
        """Stop before any step when the base model's held-out loss is not finite (NonFiniteActivationsError), naming
        the first layer whose output was not finite on a held-out batch and what works on this card."""
        if nll is None or math.isfinite(nll):
            return
        raise NonFiniteActivationsError(non_finite_base_message(nll, self._first_non_finite_layer(), self.compute_dtype,
                                                                self.precision_fixes()))

    @torch.no_grad()
    def _first_non_finite_layer(self) -> str | None:
        batch = next(iter(self.trainer.datamodule.val_dataloader()), None)
        if batch is None:
            return None
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.trainer.precision_plugin.forward_context():
            return first_non_finite_layer(self.model, lambda: self.hidden_states(batch))

    def _attention_plan(self, config, dtype: torch.dtype) -> AttentionPlan:
        """Which attention kernel each kind of micro-batch runs on this card (a ConfigError where no fused kernel
        takes the dtype: bf16 below compute capability 8.0)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        plan = attention_plan(self.hparams.attn_implementation, self.capability, dtype_name(dtype), heads, kv_heads,
                              head_dim, self.trainer.datamodule.packing)
        rank_zero_info(f"codetune attention: {plan.describe()}")
        return plan

    def on_fit_start(self) -> None:
        """Under float16's GradScaler with the residual stream scaled by 1/c, backward's activations are c times
        larger: the scaler starts at its initial scale / c so that its first steps are not skipped for it (a
        resumed run's scale comes back from the checkpoint after this hook)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self.float16_scaling is not None and scaler is not None and scaler.is_enabled():
            state = scaler.state_dict()
            scaler.load_state_dict({**state, "scale": state["scale"] / self.float16_scaling.scale})

    def _resolve_base(self, source: str | Path) -> dict[str, Any]:
        if self.hparams.revision and Path(source).expanduser().is_dir():
            raise ConfigError(f"--model.revision {self.hparams.revision!r} applies to a hub id, but "
                              f"--model.name_or_path {self.hparams.name_or_path!r} is a local directory (it has no "
                              f"revisions). Drop --model.revision, or give the hub id.")
        return base_revision(source, self.hparams.revision)

    def _check_precision(self, dtype: torch.dtype) -> None:
        """--model.dtype and --trainer.precision agree (the CLI derives the precision when it is not given), and a
        float16 GradScaler gets only fp32 gradients to unscale."""
        check_precision(dtype, self.hparams.dtype, self.trainer.precision)
        if dtype == torch.float16 and self.hparams.modules_to_save:
            raise ConfigError(f"--model.modules_to_save={list(self.hparams.modules_to_save)} with float16 "
                              f"(--model.dtype {self.hparams.dtype}): those layers would train in float16, and the "
                              f"GradScaler of 16-mixed cannot unscale float16 gradients. "
                              f"{full_layers_fix(self.capability)}")

    def _plan_memory(self, config, quantize: bool, dtype: torch.dtype,
                     device: torch.device) -> tuple[dict[str, Any] | None, bool]:
        """The memory plan of one step (`codetune.memory.fit_plan.plan_fit`), made once, and whether gradient
        checkpointing is on; it sets the micro-batch. The free memory, the card's (the smallest of all ranks' under
        DDP) or on the CPU the available RAM, is read now, with the weights and adapters loaded. Printed; returned
        for the manifest."""
        micro, checkpointing = self.micro_batch_size, self.hparams.gradient_checkpointing
        # Every other process on the card counts too: this is what the allocator can still get.
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        if free is not None:  # Lightning gives every rank the same accelerator: all ranks read a card here, or none
            free = smallest_free_memory(free, self.trainer.world_size, self._min_over_ranks)
        effective = self.trainer.datamodule.optimizer_batch_size if micro == "auto" else None
        training = self._training_shape(1 if micro == "auto" else micro, checkpointing is True, quantize, dtype, device)
        chosen = plan_fit(config, training, free=free, ram=available_ram_bytes() if free is None else None,
                          effective_batch=effective, checkpointing=checkpointing, device=str(device))
        self.numerics.planned(chosen.micro_batch_size)
        return chosen.record, chosen.gradient_checkpointing

    def _min_over_ranks(self, local: int) -> int:
        """The least of every rank's `local` (each rank calls this with its own)."""
        strategy = self.trainer.strategy
        return int(strategy.reduce(torch.tensor(local, dtype=torch.int64, device=strategy.root_device),
                                   reduce_op="min"))

    def _training_shape(self, micro: int, checkpointing: bool, quantize: bool, dtype: torch.dtype,
                        device: torch.device) -> TrainingShape:
        hp = self.hparams
        return training_shape_for(
            seq_len=hp.seq_len, micro_batch_size=micro, quantized_4bit=quantize, compute_dtype_bytes=dtype.itemsize,
            lora_rank=hp.lora_rank, lora_target_modules=hp.lora_target_modules, lora_dropout=hp.lora_dropout,
            modules_to_save=hp.modules_to_save, optimizer=self.optimizer_name, gradient_checkpointing=checkpointing,
            loss_chunk_size=hp.loss_chunk_size, attn_implementation=hp.attn_implementation,
            packing=self.trainer.datamodule.packing, device=device.type,
            unmasked_kernel=self.attention_plan.unmasked if self.attention_plan else "flash")

    def _tiny_base_dir(self) -> Path:
        """Build the tiny model once per run directory (rank zero) so every rank and a resume load the same."""
        target = Path(self.trainer.default_root_dir) / BASE_MODEL_DIR
        if self.trainer.is_global_zero and not (target / "config.json").exists():
            model = build_tiny_model(self.tokenizer, seed=self.hparams.seed,
                                     max_position_embeddings=max(self.hparams.seq_len, 4096))
            with atomic_save_dir(target) as tmp, quiet_weight_bars():
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        self.trainer.strategy.barrier("codetune-tiny-base")
        return target

    @property
    def causal_lm(self):
        """The transformers model inside the peft wrapper (LoRA layers injected)."""
        return self.model.get_base_model()

    # -- steps -----------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token cross-entropy, target count) of a micro-batch, without full logits."""
        hidden, labels = self.hidden_states(batch)
        return causal_lm_loss_sum(hidden, self.causal_lm.get_output_embeddings(), labels,
                                  self.hparams.loss_chunk_size)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states of a micro-batch of packed windows, and the labels aligned with them
        (one row of all windows under flash attention, see `one_row`)."""
        input_ids, position_ids, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        if flash_attention(self.causal_lm.config) and input_ids.shape[0] > 1:
            input_ids, position_ids, labels = one_row(input_ids, position_ids, labels)
        # No attention_mask and no cache: transformers then derives the block-diagonal causal mask
        # from position ids that restart per file (packing isolation).
        hidden = self.causal_lm.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden, labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        disable_ddp_backward_sync(self.trainer)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        started = time.perf_counter()
        self._step_loss = loss = self.backward_with_backoff(batch)
        # The precision plugin unscales the gradients (under a GradScaler) and then calls
        # on_before_optimizer_step, where the norm, the finite vote and the clipping happen.
        step_optimizer(self.trainer, optimizer, self.optimizer_name)
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # torch's warning after a step the GradScaler skipped: the schedule goes on by design (as in AMP recipes).
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
        # Reading the loss waits for every queued kernel of the step (CUDA runs asynchronously), so the
        # clock below covers the device's work, not just the launches; the logger would sync here anyway.
        loss_value = loss.item()
        self.log("train/loss", loss_value, prog_bar=True)
        self.log("train/tokens_per_s", batch["input_ids"].numel() / (time.perf_counter() - started))
        self.log("train/lr", scheduler.get_last_lr()[0])
        self.log("train/grad_norm", self._grad_norm_value)  # unscaled, before clipping; already on the host
        self.log("train/skipped_steps", float(self.skipped_steps))
        self.log("train/micro_batch_size", float(self.micro_batch_size))
        self.log("train/grad_accum", float(self.numerics.accumulation_steps(batch["input_ids"].shape[0])))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Called by the precision plugin inside `optimizer.step()`, after a GradScaler unscaled the gradients
        (Lightning's step contract), so the norm, the finite vote and the clipping see the true gradients."""
        grad_norm, self._grad_norm_value = self.finite_grad_norm(self._step_loss, optimizer)
        if not math.isfinite(self._grad_norm_value):
            # Only reachable under a float16 GradScaler: it skips this step and lowers its scale.
            self.skipped_steps += 1
            return
        if self.hparams.max_grad_norm > 0:
            # clip_grad_norm_ is exactly this, after computing the norm the guard already has.
            torch.nn.utils.clip_grads_with_norm_(stepped_parameters(optimizer), self.hparams.max_grad_norm, grad_norm)

    def backward_with_backoff(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gradients of one optimizer batch, summed over ranks, and its mean token loss (`StepNumerics.backward`:
        after an OOM on any rank every rank redoes the batch at half the micro-batch)."""
        return self.numerics.backward(self, batch)

    def finite_grad_norm(self, loss: torch.Tensor, optimizer) -> tuple[torch.Tensor, float]:
        """The step's total gradient norm (as a tensor, and as a float for the log), once every rank found it and its
        loss finite. Otherwise the run stops with NonFiniteLossError *before* the update, so no weight and no
        checkpoint ever holds nan/inf. Under a float16 GradScaler (16-mixed) an infinite gradient is the scaler's
        to skip (counted in `skipped_steps`); a non-finite loss still stops the run."""
        vote = grad_norm_vote(self.trainer, loss, optimizer)
        if not vote.finite:
            hp = self.hparams
            raise NonFiniteLossError(non_finite_step_message(
                self.trainer.global_step, vote.loss, vote.value, last_checkpoint(self.trainer),
                Path(self.trainer.default_root_dir), hp.learning_rate, hp.max_grad_norm, self.precision_fixes()))
        return vote.norm, vote.value

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n = self.eval_loss_sum(batch)
        if n > 0:
            self.val_loss.update(loss_sum / n, weight=n)

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token NLL, target count) of a validation batch (`StepNumerics.eval_loss_sum`: at the training
        micro-batch, or at halves of it should it run out of memory)."""
        return self.numerics.eval_loss_sum(self, batch)

    def on_validation_epoch_end(self) -> None:
        # A rank can hold no validation window (fewer windows than ranks) while others do; compute() below is
        # a collective, so whether to run it is decided by all ranks together.
        if not self.trainer.strategy.reduce_boolean_decision(self.val_loss.update_count > 0, all=False):
            return
        # Perplexity = exp(mean token NLL over all held-out targets), aggregated across ranks by torchmetrics.
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", torch.exp(loss))

    @torch.no_grad()
    def held_out_loss(self) -> float | None:
        """Mean token NLL over the validation windows (all held-out ones, or --data.max_val_windows of them), each
        rank computing its share (call it on every rank; all get the global figure). The base-model eval uses it with the adapter disabled; during training,
        validation logs the same quantity as val/loss."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for batch in self.trainer.datamodule.val_dataloader():
                    loss_sum, n = self.eval_loss_sum({k: v.to(self.device) for k, v in batch.items()})
                    total += torch.stack([loss_sum.double(), n.double()])
        finally:
            self.model.train(was_training)
        loss_sum, count = sum_over_ranks(self.trainer, total).tolist()
        return loss_sum / count if count else None


    # -- optimizer and checkpoints ------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.optimizer_name, params, self.hparams.learning_rate, self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A full 4-bit state dict does not reload; the frozen base is rebuilt from name_or_path anyway.
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["codetune"] = {"skipped_steps": self.skipped_steps, "base_revision": self.base_revision,
                                  "micro_batches": self.numerics.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("codetune", {})
        # The adapter fits only the base it was trained on: a hub branch that moved, or an overwritten directory.
        check_same_base(saved.get("base_revision"), self.base_revision)
        check_restores_every_trainable_tensor(checkpoint, self.trainable_state_dict(), self.hparams)
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.numerics.load_state_dict(saved.get("micro_batches", {}))
        rescale_learning_rate(checkpoint, self.hparams.learning_rate)

    def save_adapter(self, directory: Path) -> None:
        """The LoRA adapter in peft format (safetensors), loadable with PeftModel.from_pretrained. Trainable weights
        holding nan or inf are refused (NonFiniteWeightsError) and nothing is written."""
        diverged = [name for name, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if diverged:
            raise NonFiniteWeightsError(
                f"not exporting the adapter to {directory}: {len(diverged)} trainable weight tensor(s) hold nan or "
                f"inf (the first: {diverged[0]}), so training diverged. Resume from the last good checkpoint "
                f"(--ckpt_path last, or make resume RUN=<run dir>) with a lower --model.learning_rate; the adapter "
                f"is exported when that run ends.")
        with atomic_save_dir(directory) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)


def _validate(rank, alpha, dropout, lr, warmup, micro_batch, chunk) -> None:
    problems = lora_rank_problems(rank)
    if alpha <= 0:
        problems.append(f"--model.lora_alpha={alpha}: must be > 0 (usually 2 x rank)")
    problems += lora_dropout_problems(dropout)
    if not (lr > 0 and math.isfinite(lr)):
        problems.append(f"--model.learning_rate={lr}: must be a positive number (e.g. 1e-4)")
    if warmup < 0:
        problems.append(f"--model.warmup_steps={warmup}: must be >= 0")
    if micro_batch != "auto":
        problems += micro_batch_problems(micro_batch)
    problems += loss_chunk_problems(chunk)
    if problems:
        raise ConfigError("; ".join(problems))
