"""The LightningModule: a causal LM (4-bit NF4 on CUDA) with LoRA adapters, trained on packed windows.

Optimization is manual so that one optimizer step is one place in the code: each batch is a whole
optimizer batch (micro-batch x accumulation windows) that `training_step` cuts into micro-batches.
The loss of every micro-batch is a *sum* of token cross-entropies divided by the target count of
the whole optimizer batch, so the gradient is the same however the batch is cut (an OOM back-off
changes only `micro_batch_size`). The loss never materialises [batch, seq, vocab] logits at once:
see `codetune.model.loss`.

Under DDP every rank divides its summed loss by the target count of *all* ranks' windows of the step
(one all-reduce of an integer), and the gradients are then summed: the gradient is the global token
mean's whatever each rank holds, an empty share of the last step included.

Precision: 16-bit compute always runs under Lightning's autocast (`bf16-mixed`, or `16-mixed` with a
GradScaler), with the LoRA weights in fp32 and taking the 16-bit input as it is. The precision plugin
unscales the gradients inside `optimizer.step()` and then calls `on_before_optimizer_step`; that hook
computes the gradient norm, lets every rank vote that the loss and the norm are finite, and clips. If
a vote fails, the run stops (`NonFiniteLossError`) before the update, so the weights and every
checkpoint stay the last finite ones; under a GradScaler an infinite gradient is instead a skipped
step (counted). A resume at a new --model.learning_rate rescales the restored schedule to it.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from codetune.memory.backoff import accumulation_steps, halved, is_out_of_memory
from codetune.errors import (ConfigError, NonFiniteActivationsError, NonFiniteLossError, NonFiniteWeightsError,
                             OutOfMemoryAtMinimumError)
from codetune.memory.plan import (CPU_RSS_FACTOR, CPU_RSS_OVERHEAD_BYTES, DEFAULT_LORA_TARGETS, MemoryPlan, ModelShape,
                                  TrainingShape, available_ram_bytes,
                                  format_plan, optimizer_state_bytes, plan_for_card, plan_memory,
                                  training_shape_for)
from codetune.model.attention import dtype_name
from codetune.model.float16 import (DEFAULT_RESIDUAL_SCALE, ResidualScaling, check_residual_scale,
                                    first_non_finite_layer, scale_residual_stream)
from codetune.model.kernels import AttentionPlan, attention_plan
from codetune.model.loading import (NATIVE_BF16_CAPABILITY, DType, Quantization, apply_lora, check_context,
                                    check_precision, cuda_capability, enable_gradient_checkpointing,
                                    keep_adapter_input_dtype, load_causal_lm, quiet_weight_bars, resolve_dtype,
                                    resolve_quantization)
from codetune.model.loss import IGNORE_INDEX, causal_lm_loss_sum
from codetune.data.model_source import check_model_source
from codetune.model.revision import base_revision, check_same_base, pinned_revision
from codetune.model.optim import OptimizerName, build_optimizer, resolve_optimizer
from codetune.data.tokenizer import TINY_NAME
from codetune.model.tiny import build_tiny_model
from codetune.storage import BASE_MODEL_DIR, atomic_save_dir


class CodeLoRAModule(L.LightningModule):
    """QLoRA fine-tuning of a causal code LM.

    Args:
        name_or_path: Base model: a Hugging Face id (e.g. Qwen/Qwen2.5-Coder-1.5B), a local
            directory, or 'tiny' (an offline Llama built from a config, saved to the run's base_model/).
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
        name_or_path: str = TINY_NAME,
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
        self.micro_batch_size = micro_batch_size
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
        # Set by the OOM back-off callback (callbacks/oom_backoff.py); without it an OOM is raised as is.
        self.backoff = None
        # Validation's micro-batch after its own OOM back-off (None: the training micro-batch).
        self.eval_micro_batch_size: int | None = None
        # Optimizer steps a float16 GradScaler skipped (inf/nan gradients after unscaling); checkpointed.
        self.skipped_steps = 0
        self._step_loss: torch.Tensor | None = None
        self._grad_norm_value = math.nan
        self._flat_grads: dict[torch.dtype, tuple[list[torch.nn.Parameter], torch.Tensor]] = {}
        self.model = None
        self.tokenizer = None
        self.val_loss = MeanMetric()

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
                              head_dim, getattr(self.trainer.datamodule, "packing", "isolated"))
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
                              f"GradScaler of 16-mixed cannot unscale float16 gradients. {self._full_layers_fix()}")

    def _full_layers_fix(self) -> str:
        native_bf16 = self.capability is not None and self.capability >= NATIVE_BF16_CAPABILITY
        if self.capability is not None and not native_bf16:
            return (f"This card (compute capability {self.capability[0]}.{self.capability[1]}) has no native "
                    f"bfloat16: use --model.dtype float32, or drop --model.modules_to_save.")
        return "Use --model.dtype bfloat16 or float32, or drop --model.modules_to_save."

    def _plan_memory(self, config, quantize: bool, dtype: torch.dtype,
                     device: torch.device) -> tuple[dict[str, Any] | None, bool]:
        """The predicted peak of one step (codetune/memory/plan.py), made once, and whether gradient checkpointing
        is on. `--data.batch_size auto` takes its micro-batch from it and `--model.gradient_checkpointing auto`
        its choice. The card's free memory (on the CPU: the available RAM) is read now, with the weights and
        adapters loaded, so it is compared with what training will still allocate (`fits_after_load`), not with
        the whole plan. Under DDP every rank plans for the smallest free memory of all ranks' cards
        (`_smallest_free_memory`), so all of them train at the same micro-batch and checkpointing. On the CPU a plan
        that does not fit the RAM stops the run here. Printed; returned for the manifest."""
        hp = self.hparams
        # Every other process on the card counts too: this is what the allocator can still get.
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        if free is not None:  # Lightning gives every rank the same accelerator: all ranks read a card here, or none
            free = self._smallest_free_memory(free)
        try:
            shape = ModelShape.from_config(config)
        except (AttributeError, TypeError) as err:  # a config without the decoder fields the plan reads
            return self._without_plan(err, free)
        training = self._training_shape(self.micro_batch_size if self.micro_batch_size != "auto" else 1,
                                        hp.gradient_checkpointing is True, quantize, dtype, device)
        try:
            plan = self._choose(shape, training, free, device)
        except ConfigError as err:
            if self.micro_batch_size == "auto":
                raise
            return self._without_plan(err, free)
        checkpointing = plan.training.gradient_checkpointing
        self.micro_batch_size = plan.training.micro_batch_size
        if device.type == "cuda":
            self._report_card_plan(plan, free)
            return _plan_record(plan, free, plan.required_free_bytes(after_load=True), "VRAM"), checkpointing
        ram = self._report_ram_plan(plan)
        return _plan_record(plan, ram, plan.required_ram_bytes(), "RAM"), checkpointing

    def _smallest_free_memory(self, local: int) -> int:
        """The least free memory of any rank's card (this rank's `local` with one process). The micro-batch and the
        checkpointing that the plan chooses must be one for all ranks (they cut the same optimizer step alike), and
        the smallest card is the one that decides what fits. Every rank calls this from configure_model."""
        world_size = self.trainer.world_size
        if world_size == 1:
            return local
        strategy = self.trainer.strategy
        smallest = int(strategy.reduce(torch.tensor(local, dtype=torch.int64, device=strategy.root_device),
                                       reduce_op="min"))
        rank_zero_info(f"codetune: the memory plan is made for the smallest free memory of the {world_size} ranks' "
                       f"cards, {smallest / 2**30:.2f} GiB (rank 0's: {local / 2**30:.2f} GiB), so that every rank "
                       f"trains at the same micro-batch and gradient checkpointing.")
        return smallest

    def _plan_title(self, plan: MemoryPlan, memory: str) -> str:
        auto = " by the plan" if self.hparams.gradient_checkpointing == "auto" else ""
        return (f"codetune {memory} plan (micro-batch {self.micro_batch_size}, gradient checkpointing "
                f"{'on' if plan.training.gradient_checkpointing else 'off'}{auto})")

    def _report_card_plan(self, plan: MemoryPlan, free: int) -> None:
        rank_zero_info(f"{self._plan_title(plan, 'VRAM')}:\n{format_plan(plan, free, after_load=True)}")
        if not plan.fits_after_load(free):
            rank_zero_warn(f"codetune: the plan needs {plan.required_free_bytes(after_load=True) / 2**30:.2f} GiB more "
                           f"than the weights, and {free / 2**30:.2f} GiB are free; expect OOM back-offs (or lower "
                           f"--data.batch_size / --data.seq_len; `codetune plan` shows what fits).")

    def _report_ram_plan(self, plan: MemoryPlan) -> int | None:
        """Print a CPU plan against the available RAM, and stop (ConfigError) when it does not fit: on the CPU there
        is no OOM to back off from, the machine swaps until the kernel kills the process. Returns the RAM read."""
        ram = available_ram_bytes()
        rank_zero_info(f"{self._plan_title(plan, 'RAM')}:\n{format_plan(plan, ram)}")
        if ram is None:
            rank_zero_warn("codetune: the available RAM cannot be read here (no MemAvailable in /proc/meminfo), so "
                           "the memory plan is not checked against it; watch the first steps' memory.")
        elif plan.required_ram_bytes() > ram:
            raise ConfigError(ram_plan_message(plan, ram, self.hparams.gradient_checkpointing))
        return ram

    def _choose(self, shape: ModelShape, training: TrainingShape, free: int | None,
                device: torch.device) -> MemoryPlan:
        """The plan of the micro-batch and checkpointing to train with: both as given, or chosen by the plan for
        the free memory (`auto`); without a card (CPU) `auto` means checkpointing off and the whole batch."""
        auto_checkpointing = self.hparams.gradient_checkpointing == "auto"
        if free is None:  # no card to fit
            if self.micro_batch_size == "auto":
                effective = self.trainer.datamodule.optimizer_batch_size
                rank_zero_info(f"codetune: --data.batch_size auto on {device}: no card to fit, micro-batch {effective}.")
                training = replace(training, micro_batch_size=effective)
            return plan_memory(shape, training)
        effective = self.trainer.datamodule.optimizer_batch_size if self.micro_batch_size == "auto" else None
        plan = plan_for_card(shape, training, free, auto_checkpointing, effective, after_load=True)
        if effective is not None:
            tr = plan.training
            if plan.fits_after_load(free):
                rank_zero_info(f"codetune: --data.batch_size auto: micro-batch {tr.micro_batch_size} x "
                               f"{effective // tr.micro_batch_size} accumulation fits {free / 2**30:.2f} GiB free.")
            else:
                rank_zero_warn(f"codetune: --data.batch_size auto: even micro-batch 1 is predicted not to fit the "
                               f"{free / 2**30:.2f} GiB free; starting at 1 (the OOM back-off is the last resort).")
        return plan

    def _without_plan(self, why: Exception, free: int | None) -> tuple[None, bool]:
        """No plan can be made for this model: a number must be given for what the plan would choose."""
        hp = self.hparams
        if self.micro_batch_size == "auto":
            raise ConfigError(f"--data.batch_size auto needs a VRAM plan, and none can be made for this model "
                              f"({why}). Give --data.batch_size a number.") from why
        checkpointing = hp.gradient_checkpointing is True or (hp.gradient_checkpointing == "auto" and free is not None)
        auto = (f" --model.gradient_checkpointing auto turns it {'on' if checkpointing else 'off'} (no card)"
                if hp.gradient_checkpointing == "auto" else "")
        rank_zero_warn(f"codetune: no VRAM plan for this model ({why}); training goes on without one.{auto}")
        return None, checkpointing

    def _training_shape(self, micro: int, checkpointing: bool, quantize: bool, dtype: torch.dtype,
                        device: torch.device) -> TrainingShape:
        hp = self.hparams
        return training_shape_for(
            seq_len=hp.seq_len, micro_batch_size=micro, quantized_4bit=quantize, compute_dtype_bytes=dtype.itemsize,
            lora_rank=hp.lora_rank, lora_target_modules=hp.lora_target_modules, lora_dropout=hp.lora_dropout,
            modules_to_save=hp.modules_to_save, optimizer=self.optimizer_name, gradient_checkpointing=checkpointing,
            loss_chunk_size=hp.loss_chunk_size, attn_implementation=hp.attn_implementation,
            packing=getattr(self.trainer.datamodule, "packing", "isolated"), device=device.type,
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
        if _flash_attention(self.causal_lm.config) and input_ids.shape[0] > 1:
            input_ids, position_ids, labels = one_row(input_ids, position_ids, labels)
        # No attention_mask and no cache: transformers then derives the block-diagonal causal mask
        # from position ids that restart per file (packing isolation).
        hidden = self.causal_lm.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden, labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._disable_ddp_backward_sync()
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        started = time.perf_counter()
        self._step_loss = loss = self.backward_with_backoff(batch)
        # The precision plugin unscales the gradients (under a GradScaler) and then calls
        # on_before_optimizer_step, where the norm, the finite vote and the clipping happen.
        self._optimizer_step(optimizer)
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
        self.log("train/grad_accum", float(accumulation_steps(batch["input_ids"].shape[0], self.micro_batch_size)))
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
            torch.nn.utils.clip_grads_with_norm_(_stepped_parameters(optimizer), self.hparams.max_grad_norm, grad_norm)

    def _optimizer_step(self, optimizer) -> None:
        """`optimizer.step()`. Running out of memory in it (AdamW allocates its state at the first step) stops the
        run on every rank with one message: no rank may go on with weights the others did not update."""
        try:
            optimizer.step()
            ran_out = None
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            ran_out = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not self.trainer.strategy.reduce_boolean_decision(ran_out is None, all=True):
            trainable = [(p.numel(), p.element_size()) for p in _stepped_parameters(optimizer)]
            raise OutOfMemoryAtMinimumError(optimizer_oom_message(self.trainer.global_step, ran_out,
                                                                  self.optimizer_name, trainable))

    def backward_with_backoff(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gradients of one optimizer batch, summed over ranks; after an OOM on any rank, every rank drops its
        partial gradients and runs the same batch again at half the micro-batch (see codetune/memory/backoff.py).
        Returns the mean token loss of the whole (all ranks') optimizer batch."""
        # Every rank divides by the target count of all ranks together, and the gradients are then summed: the
        # gradient is the global token mean's, whatever each rank holds (an empty tail batch included).
        n_targets = self._sum_over_ranks(_count_targets(batch["labels"])).clamp(min=1)
        while True:
            loss = self._attempt(batch, n_targets)
            # Every rank reaches this point whether or not it ran out of memory, so the vote cannot hang.
            if self.trainer.strategy.reduce_boolean_decision(loss is not None, all=True):
                return self._all_reduce_gradients(loss)
            self._discard_attempt()
            self.micro_batch_size = self.backoff.after_oom(self.trainer, self.micro_batch_size,
                                                           batch["input_ids"].shape[0], ran_out=loss is None)

    def finite_grad_norm(self, loss: torch.Tensor, optimizer) -> tuple[torch.Tensor, float]:
        """The step's total gradient norm (as a tensor, and as a float for the log), once every rank found it and its
        loss finite. Otherwise the run stops with NonFiniteLossError *before* the update, so no weight and no
        checkpoint ever holds nan/inf. Under a float16 GradScaler (16-mixed) an infinite gradient is the scaler's
        to skip (counted in `skipped_steps`); a non-finite loss still stops the run."""
        grads = [p.grad for p in _stepped_parameters(optimizer) if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        # One device-to-host copy for both numbers.
        loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float().to(loss.device)]).tolist()
        finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or _grad_scaler_enabled(self.trainer))
        # Every rank votes, finite or not, so none waits in a collective that another never reaches.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            hp = self.hparams
            raise NonFiniteLossError(non_finite_step_message(
                self.trainer.global_step, loss_value, norm_value, _last_checkpoint(self.trainer),
                Path(self.trainer.default_root_dir), hp.learning_rate, hp.max_grad_norm, self.precision_fixes()))
        return grad_norm, norm_value

    def _disable_ddp_backward_sync(self) -> None:
        """Gradients are all-reduced once per optimizer step, after every rank finished its micro-batches
        (`_all_reduce_gradients`): with DDP's sync inside each backward, a rank that ran out of memory
        mid-batch would leave the others waiting in a collective forever. Lightning turns the flag back
        on after every forward (manual optimization), so it is turned off inside each step."""
        ddp = self.trainer.strategy.model
        if isinstance(ddp, DistributedDataParallel):
            ddp.require_backward_grad_sync = False

    def _attempt(self, batch: dict[str, torch.Tensor], n_targets: torch.Tensor) -> torch.Tensor | None:
        try:
            loss = self.accumulate_gradients(batch, n_targets)
            if self.trainer.world_size > 1:
                # The all-reduce's buffer is allocated here, inside the attempt, so that running out of memory
                # for it is an OOM like any other (voted on, backed off) rather than a rank missing a collective.
                self._gradient_buffers()
            return loss
        except RuntimeError as err:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate
            if self.backoff is None or not is_out_of_memory(err):
                raise
            # Leaving the except block drops the traceback, and with it the failed attempt's activations.
            return None

    def _discard_attempt(self) -> None:
        self.optimizers().zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _gradient_buffers(self) -> dict[torch.dtype, tuple[list[torch.nn.Parameter], torch.Tensor]]:
        """The trainable parameters' gradients packed into one flat tensor per dtype (LoRA's fp32, and a bf16
        `modules_to_save` copy when there is one: a collective takes one dtype)."""
        groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault(p.dtype, []).append(p)
        self._flat_grads = {dtype: (params, torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                                        .reshape(-1) for p in params]))
                            for dtype, params in groups.items()}
        return self._flat_grads

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        # torch's collective rather than strategy.reduce, which adds a barrier before each reduction.
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def _all_reduce_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """Sum the trainable parameters' gradients over ranks, one collective per dtype (each rank's gradient is
        already divided by the global target count, so the sum is the global mean's gradient). Returns the
        global batch's mean token loss (this rank's share summed over ranks)."""
        if self.trainer.world_size == 1:
            return loss
        loss = self._sum_over_ranks(loss.detach().clone())
        for params, flat in self._flat_grads.values():
            torch.distributed.all_reduce(flat)
            for p, synced in zip(params, flat.split([p.numel() for p in params])):
                p.grad = synced.view_as(p)
        self._flat_grads = {}
        return loss

    def accumulate_gradients(self, batch: dict[str, torch.Tensor], n_targets: torch.Tensor) -> torch.Tensor:
        """Forward/backward every micro-batch of this rank's share of an optimizer batch, each micro-batch's summed
        loss divided by `n_targets` (the whole optimizer batch's, all ranks); returns this rank's share of the mean."""
        total = torch.zeros((), device=self.device)
        micro_batches = split_batch(batch, self.micro_batch_size)
        for i, micro in enumerate(micro_batches):
            if self.backoff is not None:
                # Testing aid (CODETUNE_INJECT_OOM): fails on the second micro-batch, after a backward.
                self.backoff.maybe_inject_oom(self.trainer, self.micro_batch_size, i == min(1, len(micro_batches) - 1))
            loss_sum, _ = self.loss_sum(micro)
            # Divide by the whole batch's target count: gradients do not depend on the split.
            self.manual_backward(loss_sum / n_targets)
            total += loss_sum.detach()
        return total / n_targets

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n = self.eval_loss_sum(batch)
        if n > 0:
            self.val_loss.update(loss_sum / n, weight=n)

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token NLL, target count) of a validation batch, run at the training micro-batch (after an OOM
        back-off it fits too) and, should it still run out of memory, at halves of it down to one window."""
        micro_batch = min(self.eval_micro_batch_size or self.micro_batch_size, self.micro_batch_size)
        while True:
            try:
                sums = [self.loss_sum(micro) for micro in split_batch(batch, micro_batch)]
                self.eval_micro_batch_size = micro_batch
                return (torch.stack([s for s, _ in sums]).sum() if sums else torch.zeros((), device=self.device),
                        sum((n for _, n in sums), torch.zeros((), dtype=torch.int64, device=self.device)))
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
            if halved(micro_batch) is None:
                raise OutOfMemoryAtMinimumError(eval_oom_message(self.hparams.seq_len))
            micro_batch = halved(micro_batch)
            self._discard_attempt()

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
        loss_sum, count = self._sum_over_ranks(total).tolist()
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
        checkpoint["codetune"] = {"skipped_steps": self.skipped_steps, "base_revision": self.base_revision}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("codetune", {})
        # The adapter fits only the base it was trained on: a hub branch that moved, or an overwritten directory.
        check_same_base(saved.get("base_revision"), self.base_revision)
        self._check_restores_every_trainable_tensor(checkpoint)
        self.skipped_steps = saved.get("skipped_steps", 0)
        self._rescale_learning_rate(checkpoint)

    def _check_restores_every_trainable_tensor(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold only the trainable tensors, so they load with strict_loading off, which would silently
        keep a fresh adapter for every tensor the checkpoint lacks (another rank or target list at resume). Every
        trainable tensor must come back with its shape, or the resume stops naming the flags that differ."""
        saved = checkpoint.get("state_dict", {})
        now = self.trainable_state_dict()
        missing = [k for k in now if k not in saved]
        unexpected = [k for k in saved if k not in now]
        reshaped = [k for k in now if k in saved and tuple(saved[k].shape) != tuple(now[k].shape)]
        if not (missing or unexpected or reshaped):
            return
        trained = checkpoint.get("hyper_parameters", {})
        flags = [f"--model.{k} {trained[k]!r} in the checkpoint, {self.hparams[k]!r} now" for k in _ADAPTER_FLAGS
                 if k in trained and _as_list(trained[k]) != _as_list(self.hparams[k])]
        detail = "; ".join(flags) or (f"{len(missing)} trainable tensor(s) missing (e.g. {(missing or reshaped)[:1]}), "
                                      f"{len(unexpected)} not trainable now")
        raise ConfigError(f"the checkpoint does not fit this model's adapter ({detail}). Resume with the flags it "
                          f"was trained with (its run's config.yaml: make resume RUN=<run dir>), or start a new run "
                          f"without --ckpt_path.")

    def _rescale_learning_rate(self, checkpoint: dict[str, Any]) -> None:
        """A resume honours --model.learning_rate: the restored optimizer and schedule (which hold the rate the
        checkpoint was trained at) are scaled to it, at the same point of the schedule. Resuming at a lower rate
        is the fix after a nan/inf stop; without this the old rate would silently come back."""
        trained_at = checkpoint.get("hyper_parameters", {}).get("learning_rate")
        if not trained_at or trained_at == self.hparams.learning_rate or not checkpoint.get("optimizer_states"):
            return
        scale = self.hparams.learning_rate / trained_at
        for state in checkpoint["optimizer_states"]:
            for group in state["param_groups"]:
                group.update({k: group[k] * scale for k in ("lr", "initial_lr") if k in group})
        for state in checkpoint.get("lr_schedulers", []):
            for key in ("base_lrs", "_last_lr"):
                if key in state:
                    state[key] = [lr * scale for lr in state[key]]
        rank_zero_info(f"codetune: resuming at --model.learning_rate={self.hparams.learning_rate:g} (the checkpoint "
                       f"was trained at {trained_at:g}); the schedule goes on from step "
                       f"{checkpoint.get('global_step')}.")

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


def _plan_record(plan: MemoryPlan, free: int | None, required: int, memory: str) -> dict[str, Any]:
    """The manifest's `vram_plan`: the plan's figures, and the free memory (`memory`: VRAM, or RAM on the CPU)."""
    return {"memory": memory, "predicted_peak_gib": round(plan.total / 2**30, 3),
            "free_gib": None if free is None else round(free / 2**30, 3),
            "free_read": "after the model was loaded", "required_free_gib": round(required / 2**30, 3),
            "micro_batch_size": plan.training.micro_batch_size,
            "gradient_checkpointing": plan.training.gradient_checkpointing,
            "terms_gib": {k: round(v / 2**30, 3) for k, v in plan.terms().items()}}


def ram_plan_message(plan: MemoryPlan, available: int, checkpointing_flag: bool | str) -> str:
    """What stops a CPU run whose memory plan does not fit the available RAM: the figures and what to lower."""
    tr = plan.training
    fixes = [f"--data.seq_len (now {tr.seq_len})", f"--data.batch_size (now {tr.micro_batch_size})"]
    if not tr.gradient_checkpointing:
        with_it = plan_memory(plan.model, replace(tr, gradient_checkpointing=True))
        fixes.append(f"--model.gradient_checkpointing true (now {checkpointing_flag}; "
                     f"{with_it.required_ram_bytes() / 2**30:.2f} GiB)")
    return (f"the memory plan does not fit this machine's RAM: micro-batch {tr.micro_batch_size} x {tr.seq_len} "
            f"tokens is predicted to peak at {plan.total / 2**30:.2f} GiB, so training needs "
            f"{plan.required_ram_bytes() / 2**30:.2f} GiB of RAM beyond the loaded model (what is left to allocate "
            f"x{CPU_RSS_FACTOR:g} for what the CPU heap keeps, + {CPU_RSS_OVERHEAD_BYTES // 2**20} MiB), and "
            f"{available / 2**30:.2f} GiB are available: it would swap until the system kills it. Lower "
            f"{', or '.join(fixes)}, or close other programs; `codetune plan` shows the plan's terms.")


def non_finite_base_message(nll: float, layer: str | None, dtype: torch.dtype | None,
                            precision: Sequence[str]) -> str:
    """What stops a run whose base model computes non-finite numbers before any training step."""
    name = str(dtype).replace("torch.", "")
    where = f", first at the output of {layer}" if layer else ""
    if precision:
        cause = f"its activations overflow {name}'s range{where}"
        fix = "To fix: " + "; or ".join(precision) + "."
    else:
        cause = f"the base model computes non-finite values in {name}{where}"
        fix = ("Its weights may be damaged: check --model.name_or_path (a fresh download, or the directory's "
               "safetensors files).")
    return (f"the base model's held-out loss is {nll} before any training step: {cause}. Nothing was trained and no "
            f"checkpoint was written. {fix}")


def non_finite_step_message(step: int, loss: float, grad_norm: float, checkpoint: str | None, run_dir: Path,
                            learning_rate: float, max_grad_norm: float, precision: Sequence[str] = ()) -> str:
    """What NonFiniteLossError says: what was not finite, what was kept, and what to change."""
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm} while the loss is finite ({loss:.4g}): an overflow in backward"
    else:
        what = (f"another rank's loss or gradient norm is not finite (here: loss {loss:.4g}, gradient norm "
                f"{grad_norm:.4g})")
    fixes = (f"lower --model.learning_rate (now {learning_rate:g}) and keep --model.max_grad_norm > 0 (now "
             f"{max_grad_norm:g})" + "".join(f"; or {fix}" for fix in precision))
    if checkpoint:
        after = (f"The last good checkpoint is {checkpoint}. To fix: {fixes}; then resume from that checkpoint: "
                 f"the same command with --run_name {run_dir.name} --ckpt_path last, or "
                 f"make resume RUN={run_dir} ARGS='--model.learning_rate ...'.")
    else:
        after = (f"No checkpoint was written yet (--checkpoint_every_n_steps N writes one every N steps). "
                 f"To fix: {fixes}; then train again.")
    return (f"training stopped at optimizer step {step}: {what}. The step was not applied: the weights were not "
            f"updated, so they and every checkpoint hold finite values, and no adapter is exported. {after}")


def precision_fixes(dtype: torch.dtype | None, capability: tuple[int, int] | None, residual_scale: int,
                    attn_implementation: str) -> list[str]:
    """What gives an overflowing run finite numbers again, right for the card it runs on: bfloat16 where the card
    has it natively; below compute capability 8.0 (emulated, slow bfloat16) more float16 headroom or float32."""
    if dtype != torch.float16:
        return []
    if capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return ["--model.dtype bfloat16 (what auto trains in on this card; float16 ends at 65504)"]
    fixes = [f"a larger --model.float16_residual_scale (now {residual_scale}, e.g. {residual_scale * 8})"
             if residual_scale > 1 else "--model.float16_residual_scale 32 (1 turned the float16 protection off)"]
    if attn_implementation == "eager":
        fixes.append("--model.attn_implementation sdpa (eager computes the attention scores in float16)")
    card = f"compute capability {capability[0]}.{capability[1]}" if capability else "this device"
    fixes.append(f"--model.dtype float32 (this card, {card}, has no native bfloat16; float32 keeps about twice "
                 f"the activations: `codetune plan --model.dtype float32` shows whether it fits)")
    return fixes


def _stepped_parameters(optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: what Lightning's clip_gradients would clip."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grad_scaler_enabled(trainer: L.Trainer) -> bool:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint in any ModelCheckpoint's folder (the CLI runs two that share last.ckpt, which the
    interrupt callback writes too, at each epoch's last step)."""
    candidates = [path for cb in trainer.checkpoint_callbacks for path in (cb.last_model_path, cb.best_model_path)]
    candidates += [str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
                   for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    paths = {path for path in candidates if path and Path(path).is_file()}
    return max(paths, key=lambda path: Path(path).stat().st_mtime) if paths else None


# What decides the adapter's tensors: a checkpoint trained with other values of these cannot be restored.
_ADAPTER_FLAGS = ("name_or_path", "lora_rank", "lora_target_modules", "modules_to_save")


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def optimizer_oom_message(step: int, error: str | None, optimizer: str, trainable: Sequence[tuple[int, int]]) -> str:
    """What stops a run whose optimizer step ran out of memory (on this or another rank): what the state of
    `optimizer` takes for the `trainable` tensors (``(values, bytes per value)`` each), and what the 8-bit AdamW
    would save when it is not the one in use."""
    where = f"({error})" if error else "on another rank"
    kind = "adamw" if optimizer == "adamw" else "adamw_8bit"  # the two 8-bit AdamWs keep the same bytes
    state = optimizer_state_bytes(trainable, kind)
    switch = ""
    if kind == "adamw":
        smaller = optimizer_state_bytes(trainable, "adamw_8bit")
        switch = f" --model.optimizer adamw_8bit ({_mib(smaller)} of state, {_mib(state - smaller)} less),"
    return (f"out of device memory in the optimizer step at step {step} {where}: the optimizer's state (allocated "
            f"at the first step; {_mib(state)} with {optimizer} for {sum(n for n, _ in trainable):,} trainable "
            f"values) and the gradients did not fit. The step was not applied. To fit:{switch} "
            f"a smaller --model.lora_rank, fewer --model.lora_target_modules, or close other programs using the GPU; "
            f"then resume with --ckpt_path last (or train again if no checkpoint was written yet).")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def eval_oom_message(seq_len: int) -> str:
    return (f"out of device memory in validation with a micro-batch of one window of {seq_len} tokens. To fit: "
            f"--model.gradient_checkpointing true does not help here; lower --model.loss_chunk_size, use a shorter "
            f"--data.seq_len, or close other programs using the GPU. Resume with --ckpt_path last.")


def _flash_attention(config) -> bool:
    """Whether the model runs a flash-attention kernel, which reads restarting position ids as packed files only
    when the batch has one row (transformers' `_is_packed_sequence`)."""
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def one_row(input_ids: torch.Tensor, position_ids: torch.Tensor,
            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch of B windows as one row of B x S tokens, for flash attention's varlen path: every window
    starts at position 0, so it is a packed sequence of its own and no token attends across windows or files.
    Each window's first label is masked: in B rows it was never a target (nothing precedes it), and in one row
    it must not become the target of the previous window's last token."""
    labels = labels.clone()
    labels[:, 0] = IGNORE_INDEX
    return input_ids.reshape(1, -1), position_ids.reshape(1, -1), labels.reshape(1, -1)


def split_batch(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive micro-batches of at most `micro_batch_size` rows."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def _count_targets(labels: torch.Tensor) -> torch.Tensor:
    # The loss predicts labels[:, 1:]; the first column is never a target.
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _validate(rank, alpha, dropout, lr, warmup, micro_batch, chunk) -> None:
    problems = []
    if rank < 1:
        problems.append(f"--model.lora_rank={rank}: must be >= 1 (e.g. 8 or 16)")
    if alpha <= 0:
        problems.append(f"--model.lora_alpha={alpha}: must be > 0 (usually 2 x rank)")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"--model.lora_dropout={dropout}: must be in [0, 1)")
    if not (lr > 0 and math.isfinite(lr)):
        problems.append(f"--model.learning_rate={lr}: must be a positive number (e.g. 1e-4)")
    if warmup < 0:
        problems.append(f"--model.warmup_steps={warmup}: must be >= 0")
    if micro_batch != "auto" and micro_batch < 1:
        problems.append(f"--data.batch_size={micro_batch}: must be >= 1")
    if chunk is not None and chunk < 1:
        problems.append(f"--model.loss_chunk_size={chunk}: must be a positive integer or null")
    if problems:
        raise ConfigError("; ".join(problems))
