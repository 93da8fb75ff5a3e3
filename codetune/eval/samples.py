"""What an eval shows of each prompt: its record in `samples/<eval>.jsonl` and its TensorBoard text.

One JSON object per prompt, repo prompts first, then FIM prompts, then language prompts: ``kind``
(repo/fim/language), where it comes from (``path`` and ``line``, or the language ``prompt``), the
``completion``, the ``truth`` when there is one, ``new_tokens`` and ``eos``; a repo sample also has
``prompt_tail`` (the last 200 characters of the model input), a FIM sample ``mask`` (line/block),
``prefix_tail`` and ``suffix_head`` (200 characters each). In TensorBoard each prompt has one tag,
``samples/<kind>_<i>`` (``i`` its index among its kind, the same in every eval of the run), whose text is
the sample as markdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from codetune.eval.fim import FimPrompt
from codetune.eval.prompts import RepoPrompt

if TYPE_CHECKING:
    from codetune.eval.generation import Completion

# Characters of a prompt's context kept in its sample: enough to see where the completion goes.
CONTEXT_CHARS = 200


def sample_records(repo_prompts: Sequence[RepoPrompt], repo: Sequence[Completion], language_prompts: Sequence[str],
                   language: Sequence[Completion], fim_prompts: Sequence[FimPrompt] = (),
                   fim: Sequence[Completion] = ()) -> list[dict[str, Any]]:
    """The records of one eval, a prompt and its completion each: repo, then FIM, then language samples."""
    samples = [{"kind": "repo", "path": p.path, "line": p.line, "prompt_tail": p.model_input[-CONTEXT_CHARS:],
                "completion": c.text, "truth": p.continuation, "new_tokens": c.new_tokens, "eos": c.eos}
               for p, c in zip(repo_prompts, repo)]
    samples += [{"kind": "fim", "path": p.path, "line": p.line, "mask": p.kind,
                 "prefix_tail": p.prefix[-CONTEXT_CHARS:], "suffix_head": p.suffix[:CONTEXT_CHARS],
                 "completion": c.text, "truth": p.middle, "new_tokens": c.new_tokens, "eos": c.eos}
                for p, c in zip(fim_prompts, fim)]
    samples += [{"kind": "language", "prompt": prompt, "completion": c.text, "new_tokens": c.new_tokens,
                 "eos": c.eos}
                for prompt, c in zip(language_prompts, language)]
    return samples


def sample_tags(samples: list[dict[str, Any]]) -> list[str]:
    """One TensorBoard tag per prompt, the same in every eval: `samples/repo_03`, `samples/fim_00`,
    `samples/language_01`."""
    counts = {"repo": 0, "fim": 0, "language": 0}
    tags = []
    for sample in samples:
        tags.append(f"samples/{sample['kind']}_{counts[sample['kind']]:02d}")
        counts[sample["kind"]] += 1
    return tags


def sample_markdown(sample: dict[str, Any]) -> str:
    """A sample as TensorBoard shows it: where it is from, the completion, and the truth."""
    # TensorBoard renders text as markdown; fenced blocks keep code indentation.
    if sample["kind"] == "repo":
        return (f"`{sample['path']}:{sample['line']}`\n\n```\n...{sample['prompt_tail']}{sample['completion']}\n```"
                f"\n\ntruth:\n\n```\n{sample['truth']}\n```")
    if sample["kind"] == "fim":
        return (f"`{sample['path']}:{sample['line']}` ({sample['mask']} infill)\n\n```\n...{sample['prefix_tail']}\n```"
                f"\n\ngenerated:\n\n```\n{sample['completion']}\n```\n\ntruth:\n\n```\n{sample['truth']}\n```"
                f"\n\nthen:\n\n```\n{sample['suffix_head']}...\n```")
    return f"```\n{sample['prompt']}{sample['completion']}\n```"
