"""Section d, **packed-window isolation at batch > 1**, through the module's own decoder path
(`CodeLoRAModule.hidden_states`, NF4 + LoRA on CUDA).

The logits of every file segment inside a batch of packed windows equal those of the segment alone, within
`ISOLATION_RTOL` of the logits' scale (bf16: 3e-2, fp32: 1e-4), for sdpa, eager, and flash_attention_2 when
`flash_attn` imports; a control run with positions that run across files (concat packing) must differ by more,
or the row is "inconclusive". `tests/gpu` runs `isolation_errors` on a card too.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Any

import numpy as np
import torch

from .arithmetic import file_segments
from .fits import Context, budgeted, release, set_cap
from .row import FAIL, INCONCLUSIVE, NEEDS_CUDA, PASS, Row
from .settings import CONTROL_FACTOR, ISOLATION_RTOL


def section_isolation(ctx: Context) -> list[Row]:
    windows = _isolation_windows(ctx)
    rows = []
    for attn in ("sdpa", "eager", "flash_attention_2"):
        check = f"isolation, {ctx.mode.isolation_rows} windows of {windows.seq_len}, {attn}"
        if attn == "flash_attention_2" and not ctx.cuda:
            rows.append(Row("d", check, NEEDS_CUDA))
            continue
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            rows.append(Row("d", check, "skipped: flash_attn not importable"))
            continue
        rows.append(budgeted(ctx, check, partial(_isolation_row, ctx, windows, attn, check)))
    return rows


def _isolation_windows(ctx: Context):
    """A few packed windows of corpus text, cut so each window holds several files (and continued ones)."""
    from transformers import AutoTokenizer

    from codetune.data.files import DEFAULT_EXTENSIONS, scan_repository
    from codetune.data.packing import pack_windows
    from codetune.data.tokens import pad_token_id, tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    texts = [f.text for f in scan_repository(ctx.corpus, DEFAULT_EXTENSIONS).files][:64]
    seq = ctx.mode.isolation_seq_len
    rng = np.random.default_rng(0)
    # Pieces of a sixth to a half of a window: three or four files a window, some continued from the last.
    pieces = [ids[: int(rng.integers(seq // 6, seq // 2))] for ids in tokenize_texts(tokenizer, texts)
              if len(ids) >= seq // 2]
    windows = pack_windows(pieces, seq, tokenizer.eos_token_id, pad_token_id(tokenizer), "isolated")
    if len(windows) < ctx.mode.isolation_rows:
        raise RuntimeError(f"the corpus packs into {len(windows)} windows of {seq}; isolation needs "
                           f"{ctx.mode.isolation_rows}")
    n = ctx.mode.isolation_rows
    return type(windows)(windows.input_ids[:n], windows.position_ids[:n], windows.n_real[:n])


def isolation_errors(module, windows, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Max |logits of each segment inside the packed batch - logits of the segment alone|, relative to the
    largest reference logit; and the same for a control whose positions run across files (concat)."""
    input_ids = torch.from_numpy(windows.input_ids.astype(np.int64)).to(device)
    positions = torch.from_numpy(windows.position_ids.astype(np.int64)).to(device)
    batch, seq = input_ids.shape
    concat_positions = torch.arange(seq, device=device).expand(batch, seq)
    head = module.causal_lm.get_output_embeddings()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def logits(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden, _ = module.hidden_states({"input_ids": ids, "position_ids": pos, "labels": ids.clone()})
        return head(hidden.reshape(ids.shape[0], ids.shape[1], -1)).float()

    worst, control, scale, segments = 0.0, 0.0, 0.0, 0
    with torch.no_grad(), autocast:
        packed, concat = logits(input_ids, positions), logits(input_ids, concat_positions)
        for row in range(batch):
            for start, end in file_segments(windows.position_ids[row], int(windows.n_real[row])):
                if end - start < 2:
                    continue
                alone = logits(input_ids[row:row + 1, start:end], positions[row:row + 1, start:end])[0]
                scale = max(scale, float(alone.abs().max()))
                worst = max(worst, float((packed[row, start:end] - alone).abs().max()))
                if start > 0:  # a segment after others: in concat it sees them
                    control = max(control, float((concat[row, start:end] - alone).abs().max()))
                segments += 1
    return {"segments": segments, "max_abs_diff": worst, "control_max_abs_diff": control, "logit_scale": scale,
            "rel_diff": worst / scale, "control_rel_diff": control / scale}


def _isolation_row(ctx: Context, windows, attn: str, check: str) -> Row:
    from codetune.memory.shapes import DEFAULT_LORA_TARGETS
    from codetune.model.loading import apply_lora, keep_adapter_input_dtype, load_causal_lm
    from codetune.model.module import CodeLoRAModule

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    set_cap(ctx, None)
    module = CodeLoRAModule(name_or_path=str(ctx.model_dir), attn_implementation=attn, lora_dropout=0.0)
    base = load_causal_lm(ctx.model_dir, ctx.cuda, dtype, False, attn, ctx.mode.device)
    module.model = apply_lora(base if ctx.cuda else base.to(ctx.mode.device), 8, 16, 0.0, list(DEFAULT_LORA_TARGETS))
    keep_adapter_input_dtype(module.model)
    module.model.eval()
    try:
        figures = isolation_errors(module, windows, ctx.mode.device, dtype)
    finally:
        del module, base
        release(ctx)
    tol = ISOLATION_RTOL[16 if ctx.cuda else 32]
    figures["rtol"] = tol
    if figures["rel_diff"] > tol:
        status = FAIL
    elif figures["control_rel_diff"] < CONTROL_FACTOR * tol:
        status = INCONCLUSIVE
    else:
        status = PASS
    return Row("d", check, status,
               f"{figures['segments']} segments: rel diff {figures['rel_diff']:.1e}; control (concat) "
               f"{figures['control_rel_diff']:.1e}",
               f"<= {tol:g} of the logits' scale; control >= {CONTROL_FACTOR * tol:g}", figures)
