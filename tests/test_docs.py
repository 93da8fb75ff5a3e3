"""The user's documents hold together: the README is short and links every page of docs/, every relative link
and anchor resolves, and every `codetune` and `make` command they show names a real command, target and flags."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from helpers import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES, ROOT / "bench" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_short_and_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 220
    assert [p.name for p in PAGES if f"(docs/{p.name}" not in text] == []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(document):
    broken = []
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        page = (document.parent / path).resolve() if path else document
        if not page.exists() or (anchor and page.suffix == ".md" and anchor not in anchors(page)):
            broken.append(target)
    assert broken == []


def test_the_slug_is_githubs():
    assert slug("Export: llama.cpp, Ollama, vLLM") == "export-llamacpp-ollama-vllm"


def shown_commands(tool: str) -> list[str]:
    """Every `tool ...` command in a code span or a code block line of the documents (up to a comment)."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        spans = re.findall(r"`([^`\n]+)`", text) + [line for block in re.findall(r"```\w*\n(.*?)```", text, re.S)
                                                    for line in block.splitlines()]
        found += [s.split("#")[0].strip() for s in spans if s.startswith(f"{tool} ")]
    return sorted(set(found))


@cache
def command_help(command: str) -> str:
    code = "import sys\nfrom codetune.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, command, "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("shown", shown_commands("codetune"))
def test_every_codetune_command_shown_has_its_command_and_flags(shown):
    from codetune.__main__ import COMMANDS

    words = shown.split()
    if not re.fullmatch(r"[a-z]+", words[1]):  # `codetune --help`, `codetune <command>`, a table of figures
        return
    assert words[1] in COMMANDS
    flags = {w.split("=")[0].split("+")[0] for w in words if w.startswith("--")}
    help_text = command_help(words[1])
    assert [f for f in flags if not re.search(re.escape(f) + r"(?![\w.-])", help_text)] == []


def test_every_make_target_shown_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    shown = {c.split()[1] for c in shown_commands("make")}
    assert shown and shown - targets == set()
