"""The architecture of glorocert, as executable specifications.

Layers (top to bottom, each importing only the layers below it) are declared in
the `[tool.importlinter]` section of pyproject.toml and checked by `lint-imports`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "glorocert").rglob("*.py"))

# Only these may be imported inside a function: heavy or optional dependencies whose
# import is deferred until needed. Never glorocert itself, never the standard library.
LAZY_IMPORTS_ALLOWED = {
    "torch", "onnx", "onnxruntime", "onnxscript", "pyarrow", "matplotlib", "PIL",
    "sklearn", "mlxtend", "foolbox", "safetensors", "scipy", "statsmodels", "ray",
}

# glorocert's own modules that import torch may be deferred too, and only these: certify's fast path (an ONNX
# model with a frozen bound) runs without torch, so the commands and modules it passes through import them
# where they are used. The last test checks that each really imports torch (else it has no reason to wait).
LAZY_GLOROCERT_ALLOWED = {
    "glorocert.studies", "glorocert.train", "glorocert.certify.local_stage", "glorocert.lipschitz.compose",
    "glorocert.lipschitz.operators",
}

MAX_FUNCTION_LINES = 60
# "module:qualname" -> why this function may be longer than MAX_FUNCTION_LINES.
EXCEPTIONS: dict[str, str] = {
    "glorocert.cli:train": "its signature declares one typer option per training setting (over 30 lines)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _functions(tree: ast.AST):
    """Yield (qualname, node) for every function, methods and nested functions included."""
    stack = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    yield prefix + child.name, child
                stack.append((child, f"{prefix}{child.name}."))
            else:
                stack.append((child, prefix))


def _parsed():
    for path in SOURCES:
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_layers_contract_holds():
    lint = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    run = subprocess.run(
        [sys.executable, "-c", lint, "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, f"lint-imports failed:\n{run.stdout}\n{run.stderr}"


def test_no_import_cycles_in_the_package():
    graph = grimp.build_graph("glorocert", cache_dir=None)
    for facade in graph.find_modules_directly_imported_by("glorocert"):
        # the root re-exports the facade: on top by construction (the next test keeps it there)
        graph.remove_import(importer="glorocert", imported=facade)
    cycles = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:  # importer -> imported -> ... -> importer
                cycle = (importer, *back[:-1])
                start = cycle.index(min(cycle))
                cycles.add(cycle[start:] + cycle[:start])
    report = "\n".join(" -> ".join((*cycle, cycle[0])) for cycle in sorted(cycles))
    assert not cycles, f"import cycles:\n{report}"


def test_no_module_below_the_cli_imports_the_package_root():
    graph = grimp.build_graph("glorocert", cache_dir=None)
    importers = graph.find_modules_that_directly_import("glorocert") - {"glorocert.cli"}
    assert not importers, (
        "take the version from glorocert._version and the API from glorocert.api, "
        f"not from the package root: {sorted(importers)}"
    )


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    offending = set()
    for path, tree in _parsed():
        for _, function in _functions(tree):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    tops = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    if node.module in LAZY_GLOROCERT_ALLOWED:
                        continue
                    tops = {"glorocert" if node.level else node.module.split(".")[0]}
                else:
                    continue
                if not tops <= LAZY_IMPORTS_ALLOWED:
                    offending.add(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    report = "\n".join(sorted(offending, key=lambda line: (line.split(":")[0], int(line.split(":")[1]))))
    assert not offending, (f"imports inside functions (only {sorted(LAZY_IMPORTS_ALLOWED | LAZY_GLOROCERT_ALLOWED)} may "
                           f"be deferred):\n{report}")


def test_the_deferred_glorocert_modules_are_those_that_import_torch():
    graph = grimp.build_graph("glorocert", include_external_packages=True, cache_dir=None)
    light = sorted(m for m in LAZY_GLOROCERT_ALLOWED
                   if not any(graph.chain_exists(importer=module, imported="torch")
                              for module in graph.find_descendants(m) | {m}))
    assert not light, f"deferred without reason (they do not import torch): {light}"


def test_no_function_is_longer_than_60_lines():
    too_long = {}
    for path, tree in _parsed():
        for qualname, function in _functions(tree):
            lines = function.end_lineno - function.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long[f"{_module_name(path)}:{qualname}"] = f"{path.relative_to(ROOT)}:{function.lineno}: {lines} lines"
    unexcused = {key: where for key, where in too_long.items() if key not in EXCEPTIONS}
    stale = sorted(set(EXCEPTIONS) - set(too_long))
    report = "\n".join(f"{where}  {key}" for key, where in sorted(unexcused.items(), key=lambda kv: kv[1]))
    assert not unexcused, f"functions longer than {MAX_FUNCTION_LINES} lines:\n{report}"
    assert not stale, f"EXCEPTIONS lists functions that are gone or short enough now: {stale}"
