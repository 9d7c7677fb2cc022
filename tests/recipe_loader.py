"""Import a script of `recipes/` (or `benchmarks/`) as a module, the way the tests and the DDP probe call into it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def load_recipe(name: str, folder: str = "recipes"):
    """<folder>/<name>.py as the module `<name>_recipe`, loaded once per process."""
    module_name = f"{name}_recipe" if folder == "recipes" else f"{name}_{folder}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
