"""The package's shape, read from its source: the layer order of docs/architecture.md, no import circle, no file
over 500 lines and no function over 50 (docstring excluded)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 50


def package_files() -> dict[str, Path]:
    """Module name -> file, for codetune/ and the top-level callbacks/ (installed as codetune.callbacks)."""
    files = {}
    for top, package in (("codetune", "codetune"), ("callbacks", "codetune.callbacks")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT / top).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files[".".join((package, *parts))] = path
    return files


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (function-level and TYPE_CHECKING imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def layer_order() -> list[list[str]]:
    """The numbered list after `<!-- layers -->` in docs/architecture.md: each line's module prefixes."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("<!-- layers -->", 1)[1].split("```")[1]
    return [line.split(".", 1)[1].split() for line in block.strip().splitlines() if re.match(r"\d+\.", line)]


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    matches = [(len(prefix), i) for i, layer in enumerate(layers) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_every_module_belongs_to_a_layer():
    layers = layer_order()
    assert [m for m in package_files() if m != "codetune" and layer_of(m, layers) is None] == []


def test_no_module_imports_from_a_higher_layer():
    layers = layer_order()
    upward = [f"{module} (layer {layer_of(module, layers) + 1}) imports {target} (layer {layer_of(target, layers) + 1})"
              for module, targets in import_graph().items() if module != "codetune"
              for target in sorted(targets) if target != "codetune"
              and layer_of(target, layers) > layer_of(module, layers)]
    assert upward == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_layer_check_sees_a_violation(tmp_path):
    source = tmp_path / "low.py"
    source.write_text("def f():\n    from codetune.cli import CodeTuneCLI\n")
    layers = layer_order()
    targets = imported_modules(source, "codetune.data.low", {"codetune.cli"})
    assert targets == {"codetune.cli"} and layer_of("codetune.cli", layers) > layer_of("codetune.data.low", layers)


@pytest.mark.parametrize("name", sorted(package_files()))
def test_no_file_over_the_limit(name):
    lines = len(package_files()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{name}: {lines} lines"


def function_lengths(path: Path) -> dict[str, int]:
    """Lines of each function's body in `path`, its docstring excluded."""
    lengths = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str)
            start = body[1].lineno if docstring and len(body) > 1 else body[0].lineno
            lengths[f"{node.name}:{node.lineno}"] = node.end_lineno - start + 1
    return lengths


def test_no_function_over_the_limit():
    long = {f"{name}.{function}": n for name, path in package_files().items()
            for function, n in function_lengths(path).items() if n > MAX_FUNCTION_LINES}
    assert long == {}
