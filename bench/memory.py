"""Peak memory of one training step: chunked vs plain causal-LM loss.

Run from the repository root::

    python -m bench.memory                          # CPU, 4 x 4096 tokens, vocab 151,936
    python -m bench.memory --device cuda --batch 4 --seq-len 4096 --chunk-size 1024

The model is a 2-layer Llama with hidden size 128 and a real code-model vocabulary (151,936, as
Qwen2.5-Coder), untied embeddings, so that, as in the real 1.5B case, the logits dominate the
step's memory. One step is a forward through the model, `causal_lm_loss_sum` divided by the
target count, and backward through every parameter.

Each variant runs in a fresh process, so allocator caches and peaks of one cannot leak into the
other. On CPU the figure is the process's peak RSS (``ru_maxrss``) at the end of the step minus
the peak after the model and inputs were built; on CUDA it is ``torch.cuda.max_memory_allocated``
during the step minus the memory allocated before it.

The plain loss keeps about three fp32 copies of the logits alive at its peak (the saved
log-softmax, its gradient, and the logits' gradient): 30 GB at 4 x 4096 x 151,936. When that does
not fit in the memory budget, the comparison runs at the largest batch that fits, says so, and
the chunked loss is also measured alone at the requested batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FP32_BYTES = 4
# Saved log-softmax + its gradient + the logits' gradient, all fp32 and all B*T x vocab.
PLAIN_LOSS_LOGIT_COPIES = 3
MB = 2**20


def plain_loss_peak_bytes(tokens: int, vocab: int) -> int:
    """Rough peak of the plain loss: three fp32 tensors the size of the logits."""
    return PLAIN_LOSS_LOGIT_COPIES * tokens * vocab * FP32_BYTES


def largest_fitting_batch(batch: int, seq_len: int, vocab: int, budget_bytes: int) -> int:
    """The largest batch <= `batch` whose plain-loss estimate fits the budget (0 if none does)."""
    while batch > 0 and plain_loss_peak_bytes(batch * seq_len, vocab) > budget_bytes:
        batch -= 1
    return batch


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return kib * 1024


def measure_step(batch: int, seq_len: int, vocab: int, chunk_size: int | None, device: str, dtype: str) -> dict:
    """Build the model, run one training step, return its peak memory above baseline and time."""
    import torch

    from codetune.model.loss import causal_lm_loss_sum

    torch.manual_seed(0)
    model = _small_model_with_large_vocab(vocab, seq_len).to(device=device, dtype=getattr(torch, dtype)).train()
    input_ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        baseline_mb = torch.cuda.memory_allocated() / MB
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline_mb = _peak_mb(device)

    start = time.perf_counter()
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    loss_sum, n_targets = causal_lm_loss_sum(hidden, model.lm_head, input_ids, chunk_size)
    # Mean over target tokens, as a trainer normalising one micro-batch would.
    (loss_sum / n_targets).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "baseline_mb": baseline_mb,
        "step_peak_mb": _peak_mb(device) - baseline_mb,
        "seconds": seconds,
        "loss": (loss_sum / n_targets).item(),
    }


def _small_model_with_large_vocab(vocab: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Untied, so lm_head is a separate Linear as in Qwen2.5-Coder-1.5B; the body is tiny so the
    # logits, not the layers, decide the peak.
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _peak_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / MB
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_fresh_process(batch: int, args: argparse.Namespace, chunk_size: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--worker", "--batch", str(batch)]
    cmd += ["--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--device", args.device]
    cmd += ["--dtype", args.dtype, "--chunk-size", str(chunk_size or 0)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"worker {cmd} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size (rows)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per loss chunk (0: plain)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5-Coder: 151,936)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="memory the plain loss may use (default: 70%% of what is available now)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.worker and args.chunk_size <= 0:
        raise SystemExit(f"--chunk-size must be a positive number of tokens, got {args.chunk_size}")
    if args.worker:
        print(json.dumps(measure_step(args.batch, args.seq_len, args.vocab, args.chunk_size or None, args.device, args.dtype)))
        return

    budget = int(args.budget_gb * 2**30) if args.budget_gb else int(0.7 * available_bytes(args.device))
    fit = largest_fitting_batch(args.batch, args.seq_len, args.vocab, budget)
    if fit == 0:
        raise SystemExit(
            f"the plain loss needs ~{plain_loss_peak_bytes(args.seq_len, args.vocab) / 2**30:.1f} GiB even at "
            f"batch 1, over the {budget / 2**30:.1f} GiB budget; lower --seq-len or raise --budget-gb"
        )
    print(f"device {args.device}, model dtype {args.dtype}, vocab {args.vocab}, chunk {args.chunk_size} tokens")
    if fit < args.batch:
        need = plain_loss_peak_bytes(args.batch * args.seq_len, args.vocab) / 2**30
        print(
            f"NOTE: the plain loss at {args.batch} x {args.seq_len} needs ~{need:.1f} GiB, over the "
            f"{budget / 2**30:.1f} GiB budget: comparing at batch {fit}, and measuring the chunked loss "
            f"alone at batch {args.batch}."
        )

    rows = [
        ("plain", fit, run_in_fresh_process(fit, args, None)),
        (f"chunked {args.chunk_size}", fit, run_in_fresh_process(fit, args, args.chunk_size)),
    ]
    if fit < args.batch:
        rows.append((f"chunked {args.chunk_size}", args.batch, run_in_fresh_process(args.batch, args, args.chunk_size)))

    print(f"{'variant':<14} {'tokens':>12} {'baseline MB':>12} {'step peak MB':>13} {'seconds':>8} {'loss':>8}")
    for name, batch, r in rows:
        tokens = f"{batch} x {args.seq_len}"
        print(
            f"{name:<14} {tokens:>12} {r['baseline_mb']:>12.0f} {r['step_peak_mb']:>13.0f} "
            f"{r['seconds']:>8.1f} {r['loss']:>8.4f}"
        )
    ratio = rows[1][2]["step_peak_mb"] / rows[0][2]["step_peak_mb"]
    print(f"chunked/plain step peak at {fit} x {args.seq_len}: {ratio:.3f}")
    if fit < args.batch:
        plain_mb = plain_loss_peak_bytes(args.batch * args.seq_len, args.vocab) / MB
        chunked_mb = rows[2][2]["step_peak_mb"]
        print(
            f"chunked at {args.batch} x {args.seq_len} vs the plain loss's estimate there (~{plain_mb:.0f} MB, "
            f"not measured): {chunked_mb / plain_mb:.3f}"
        )


if __name__ == "__main__":
    main()
