"""Module paths of 0.2.0 that moved in 0.3.0, kept importable: `import hf_condroute.block` and the like still work.

The package root was regrouped into layers (see CONTRIBUTING.md); an old path resolves to the module at its new
place (the same module object, so monkeypatching either name patches both) with a FutureWarning that names the new
path. The table is the CHANGELOG's list of moves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old path under hf_condroute -> new path; a package's submodules follow it (hf_condroute.glue.tasks -> ...)
MOVED = {
    "api": "block.api",
    "context": "block.context",
    "step": "block.step",
    "multigate": "block.multigate",
    "feature_maps": "block.feature_maps",
    "rewards": "block.rewards",
    "routing_config": "routers.config",
    "validation": "routers.validation",
    "capacity": "routers.capacity",
    "losses": "routers.losses",
    "hashing": "routers.hashing",
    "quantized": "experts.quantized",
    "metrics": "stats.metrics",
    "plots": "stats.plots",
    "hub": "stats.hub",
    "callbacks": "integrations.callbacks",
    "trainer_loss": "integrations.trainer_loss",
    "distributed": "integrations.distributed",
    "warm_start": "integrations.warm_start",
    "local_search": "integrations.local_search",
    "cli": "studies.cli",
    "study_rows": "studies.rows",
    "dae_syn": "studies.dae_syn",
    "res_dom": "studies.res_dom",
    "moesart_bench": "studies.moesart_bench",
    "glue": "studies.glue",
    "squad": "studies.squad",
    "moebert.task_runs": "studies.moebert_tasks",
}


def new_name(fullname: str) -> str | None:
    """The current module path of an old `hf_condroute.<...>` path, or None if it did not move."""
    package, _, rest = fullname.partition(".")
    if package != __package__ or not rest:
        return None
    parts = rest.split(".")
    for i in range(len(parts), 0, -1):
        old = ".".join(parts[:i])
        if old in MOVED:
            return ".".join([package, MOVED[old], *parts[i:]])
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=False)

    def create_module(self, spec):
        target_name = new_name(spec.name)
        warnings.warn(
            f"`{spec.name}` moved to `{target_name}` in hf_condroute 0.3.0; import it from there (the old path is "
            "an alias that will be removed in a later minor version).",
            FutureWarning,
            stacklevel=2,
        )
        module = importlib.import_module(target_name)
        self._specs[spec.name] = module.__spec__  # the import machinery overwrites it with the alias's spec
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__spec__.name)  # the module at its new place has run already


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy of a submodule
