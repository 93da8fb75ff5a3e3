"""`codetune` / `python -m codetune`: the list of commands, and dispatch to one.

`codetune --help` and an unknown command are answered here, from the standard library alone (no torch,
no Lightning: they take seconds to import). Every command first gets the CUDA allocator's configuration
(`codetune.memory.allocator`), which must be in the environment before torch is imported. Each command imports
only what it uses: `inspect` and `compare` start without Lightning, peft or bitsandbytes; `fit`, `prepare`
and `plan` need Lightning's parser and the real classes' signatures; `generate` and `merge` need torch and peft; `export` torch, safetensors and gguf.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence

from codetune.memory.allocator import set_allocator_default

COMMANDS = {
    "fit": "Fine-tune a model on a repository with QLoRA; the last line printed is the run directory.",
    "inspect": "A repository's language mix, skipped files and the config to train it with.",
    "plan": "The VRAM plan of a config on a card, before anything is downloaded or loaded.",
    "prepare": "Only scan, tokenize and pack a repository: arrays, tokenizer and report in a directory.",
    "compare": "Finished runs side by side: losses, perplexity, time, tokens, VRAM, config differences.",
    "generate": "Complete code with a finished run (its base model plus its LoRA adapter).",
    "merge": "Fold a run's adapter into its base and save a plain transformers model.",
    "export": "A run's adapter for llama.cpp or Ollama (GGUF) or vLLM, and the commands that serve it.",
}
# Lightning's other subcommands, and why codetune has none of them.
NOT_OFFERED = ("validate", "test", "predict")
NOT_OFFERED_WHY = ("codetune has no test set or prediction step; every `codetune fit` ends by measuring the "
                   "loss on held-out files (MANIFEST.json's final_val_loss, shown by `codetune compare RUN`)")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: codetune <command> [options]   (`codetune <command> --help` describes its options)", "",
             "Fine-tune a code LLM on your own repository with 4-bit QLoRA.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "--config takes a YAML file or a shipped config's name: default, rust (add: demo, the offline "
                  "tiny-model preset).", "e.g. codetune fit --config rust --data.repo ~/code/crate"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of every command; returns the exit status (2 for a usage error, as argparse)."""
    # Before any command imports torch, whose allocator reads it once (codetune/memory/allocator.py).
    set_allocator_default()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(usage(), file=sys.stdout if command else sys.stderr)
        return 0 if command else 2
    if command not in COMMANDS:
        print(f"codetune: error: {unknown_command(command)}", file=sys.stderr)
        return 2
    return _command(command)(argv if command == "fit" else argv[1:])


def unknown_command(command: str) -> str:
    """The one-line error for a command codetune does not have, with the closest one."""
    listed = f"commands: {', '.join(COMMANDS)} (`codetune --help` describes them)"
    if command in NOT_OFFERED:
        return f"there is no `codetune {command}`: {NOT_OFFERED_WHY}. The {listed}."
    close = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f" (did you mean `codetune {close[0]}`?)" if close else ""
    return f"invalid command {command!r}{hint}. The {listed}."


def _command(name: str) -> Callable[[list[str]], int]:
    """The command's entry point, imported only now (each takes the arguments after its name but fit)."""
    from codetune.errors import exit_status

    if name == "inspect":
        from codetune.commands.inspect_repo import run

        return run
    if name == "compare":
        from codetune.commands.compare import run

        return run
    if name == "plan":
        from codetune.commands.plan import main as plan

        return plan
    if name == "prepare":
        from codetune.commands.prepare import main as prepare

        return lambda args: exit_status(lambda: prepare(args), "codetune prepare")
    if name == "export":
        from codetune.commands.export import main as export

        return lambda args: exit_status(lambda: export(args), "codetune export")
    if name == "generate":
        from codetune.commands.generate import main as generate

        return lambda args: exit_status(lambda: generate(args), "codetune generate")
    if name == "merge":
        from codetune.commands.merge import main as merge

        return lambda args: exit_status(lambda: merge(args), "codetune merge")
    from codetune.cli import run_fit

    return lambda args: exit_status(lambda: run_fit(args), "codetune fit")


if __name__ == "__main__":
    sys.exit(main())
