"""The package layout is a promise (CONTRIBUTING.md's map): each layer imports only the layers below it, nothing in
the library imports the studies, no file imports itself back through a circle, and library files stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_condroute"

# layer -> the layers it may import (besides itself); "" is the package root (its __init__ and top-level modules)
ALLOWED = {
    "architectures": set(),
    "routers": set(),
    "experts": {"routers"},
    "block": {"routers", "experts", "architectures"},
    "stats": {"routers", "experts", "block"},
    "moebert": {"routers", "experts", "block", "architectures"},
    "tuners": {"routers", "experts", "block", "stats", "moebert", "architectures"},  # the routed FFN is MoEBERT's
    "integrations": {"routers", "experts", "block", "stats", "tuners", "moebert", "architectures"},
    "export": {"routers", "experts", "block", "stats", "tuners", "moebert", "architectures"},
}
LIBRARY_LINE_LIMIT = 400


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The hf_condroute modules a file imports (relative imports resolved; `from x import module` counts the module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_condroute"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_condroute"):
                continue
            modules = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found.update(modules)
            if len(modules) < len(node.names):  # names defined in `target` itself
                found.add(target)
    return found


LIBRARY = [p for p in sorted(PACKAGE.rglob("*.py")) if _layer(_module_name(p)) != "studies"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_layer_imports_only_the_layers_below_it(path):
    layer = _layer(_module_name(path))
    if layer in ("", "_moved", "report"):
        return  # the root gathers the public API; the aliases point anywhere by design
    allowed = ALLOWED[layer] | {layer}
    wrong = sorted(m for m in _imports(path) if _layer(m) not in allowed)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}/) imports {wrong}; CONTRIBUTING.md's map allows {allowed}"


def test_no_import_circle_between_files():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = {m for m in _imports(path) if m != _module_name(path)}
    # a submodule import also runs its packages' __init__s, which is not an edge of its own here
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt]
                if not all(_is_package_init(a, b) for a, b in zip(cycle, cycle[1:])):
                    pytest.fail(f"import circle: {' -> '.join(cycle)}")
            elif not state.get(nxt):
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def _is_package_init(a: str, b: str) -> bool:
    # a package's __init__ importing its own submodule, which reaches back for a sibling through the package
    return a.startswith(b + ".") or b.startswith(a + ".")


def test_library_files_stay_small():
    big = {
        str(p.relative_to(PACKAGE)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > LIBRARY_LINE_LIMIT
    }
    assert not big, f"library files over {LIBRARY_LINE_LIMIT} lines (split them by job): {big}"


def test_the_library_never_imports_the_studies():
    offenders = [str(p.relative_to(PACKAGE)) for p in LIBRARY if any(_layer(m) == "studies" for m in _imports(p))]
    assert not offenders


def test_old_module_paths_resolve_to_the_same_modules_with_a_warning():
    import importlib
    import sys

    import hf_condroute
    from hf_condroute._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(f"hf_condroute.{old}", None)
        with pytest.warns(FutureWarning, match=f"hf_condroute.{new}"):
            module = importlib.import_module(f"hf_condroute.{old}")
        assert module is importlib.import_module(f"hf_condroute.{new}")
        assert module.__spec__.name == f"hf_condroute.{new}"  # the real module keeps its own identity
    assert hf_condroute.block.RoutedBlock is hf_condroute.RoutedBlock
