"""Where a transformer's feed-forward network (FFN) lives, for the architectures we know and for any other
through explicit names.

An FFN computes out_proj(dropout(act(in_proj(x)))), or out_proj(dropout(act(gate(x)) * up(x))) when gated.
Its pieces are named by paths from the module that holds it (the parent of the module the routed FFN
replaces, its *entry*: the module the FFN's input enters). In BERT the FFN spans two sibling modules
(`intermediate` = dense + activation, then `output.dense`), so the entry is `intermediate` and the output
projection lies beside it; in T5 the whole FFN is `DenseReluDense`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from ..architectures import FFN_LAYOUTS, ROUTED_FFN_TARGET_MODULES, FFNLayout


@dataclass
class FFNParts:
    """One FFN of a model, resolved to its modules."""

    name: str  # the entry's module name in the model
    parent: nn.Module
    layout: FFNLayout
    in_proj: tuple[nn.Linear, ...]  # (proj,) or (gate, up)
    out_proj: nn.Linear
    activation: Callable
    dropout: nn.Module | None

    @property
    def gated(self) -> bool:
        return len(self.in_proj) == 2

    @property
    def ffn_dim(self) -> int:
        return self.in_proj[0].out_features

    @property
    def in_features(self) -> int:
        return self.in_proj[0].in_features

    @property
    def out_features(self) -> int:
        return self.out_proj.out_features

    @property
    def out_proj_outside_entry(self) -> bool:
        """True when the output projection is not inside the entry (BERT): it must be replaced on its own."""
        return not self.layout.out_proj.startswith(self.layout.entry + ".")


def layout_from_fields(
    entry: str,
    in_proj: list[str] | tuple[str, ...] | str | None,
    out_proj: str | None,
    activation: str | None,
    dropout: str | None = None,
) -> FFNLayout | None:
    """A layout from a config's `ffn_*` fields (None when they are not set)."""
    if in_proj is None:
        return None
    in_proj = (in_proj,) if isinstance(in_proj, str) else tuple(in_proj)
    return FFNLayout(entry, in_proj, out_proj, activation, dropout)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _resolve_path(parent: nn.Module, path: str):
    """parent.<path>, looking through PEFT layers on the way (a second adapter finds the first one's wrappers)."""
    obj = parent
    for attr in path.split("."):
        obj = getattr(_unwrap(obj) if isinstance(obj, nn.Module) else obj, attr, None)
        if obj is None:
            return None
    return obj


def _activation(parent: nn.Module, spec: str) -> Callable | None:
    found = _resolve_path(parent, spec)
    if found is not None:
        return _unwrap(found) if isinstance(found, nn.Module) else found
    from transformers.activations import ACT2FN

    return ACT2FN[spec] if spec in ACT2FN else None


def try_resolve(name: str, parent: nn.Module, layout: FFNLayout) -> FFNParts | None:
    """The FFN at `name` under `layout`, or None if one of its pieces is missing."""
    modules = [_resolve_path(parent, p) for p in (*layout.in_proj, layout.out_proj)]
    if any(m is None for m in modules):
        return None
    modules = [_unwrap(m) for m in modules]
    act = _activation(parent, layout.activation)
    if act is None:
        return None
    dropout = None
    if layout.dropout is not None:
        dropout = _resolve_path(parent, layout.dropout)
        if dropout is None:
            return None
    return FFNParts(name, parent, layout, tuple(modules[:-1]), modules[-1], act, dropout)


def resolve_ffn(name: str, parent: nn.Module, entry: str, model_type: str | None, layout: FFNLayout | None) -> FFNParts:
    """Resolve the FFN whose entry is `parent.<entry>` (module name `name`), with the given layout or the known ones."""
    if layout is not None:
        candidates = (layout,)
    else:
        candidates = tuple(c for c in FFN_LAYOUTS.get(model_type or "", ()) if c.entry == entry)
        if not candidates:
            known = ", ".join(sorted(FFN_LAYOUTS))
            raise ValueError(
                f"Don't know where the feed-forward pieces of {name} are (model type {model_type!r}; known: {known}). "
                "Name them in the config, as paths from the module that holds the FFN: `ffn_in_proj` (input "
                "projection, or [gate, up] for a gated FFN), `ffn_out_proj`, `ffn_activation` (a path or a "
                "transformers ACT2FN name) and optionally `ffn_dropout`. BERT's would be "
                "ffn_in_proj=['intermediate.dense'], ffn_out_proj='output.dense', "
                "ffn_activation='intermediate.intermediate_act_fn'."
            )
    for candidate in candidates:
        parts = try_resolve(name, parent, candidate)
        if parts is not None:
            _check_parts(parts)
            return parts
    tried = "; ".join(
        f"in_proj={list(c.in_proj)}, out_proj={c.out_proj!r}, activation={c.activation!r}, dropout={c.dropout!r}"
        for c in candidates
    )
    raise ValueError(
        f"The feed-forward pieces of {name} were not found under its parent ({tried}). Check `ffn_in_proj`, "
        "`ffn_out_proj`, `ffn_activation` and `ffn_dropout`: paths from the module that holds the FFN."
    )


def _check_parts(parts: FFNParts) -> None:
    for module in (*parts.in_proj, parts.out_proj):
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"The routed FFN slices nn.Linear projections, but a projection of {parts.name} is "
                f"{type(module).__name__}. Point `ffn_in_proj`/`ffn_out_proj` at nn.Linear modules."
            )
    dims = {(m.in_features, m.out_features) for m in parts.in_proj}
    if len(dims) != 1 or parts.out_proj.in_features != parts.ffn_dim:
        raise ValueError(
            f"The projections of {parts.name} do not chain: input projection(s) {sorted(dims)} (in, out), output "
            f"projection ({parts.out_proj.in_features}, {parts.out_proj.out_features}). Check `ffn_in_proj` and "
            "`ffn_out_proj`."
        )


def find_ffns(
    model: nn.Module,
    target_modules: list[str] | set[str] | str | None = None,
    layout: FFNLayout | None = None,
    exclude_modules=None,
    modules_to_save=None,
    allow_peft_layers: bool = False,
) -> dict[str, FFNParts]:
    """Every FFN of a model, by entry module name, in model order.

    target_modules: entry names (suffixes) or a regex, as PEFT matches them; None: the architecture default.
    layout: the pieces' paths (its `entry` is ignored: each matched module is the entry); None: the known layouts.
    allow_peft_layers: look through PEFT layers already in the model (adding a second adapter); by default such a
        model is refused, since importance scores belong to the dense model.
    """
    has_peft = any(isinstance(m, BaseTunerLayer) for m in model.modules())
    if has_peft and not allow_peft_layers:
        raise ValueError(
            "This model already has PEFT layers. Find FFNs (and compute importance scores) on the dense model, before "
            "`get_peft_model`."
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        target_modules = ROUTED_FFN_TARGET_MODULES.get(model_type)
        if target_modules is None:
            raise ValueError(
                f"No default FFN modules for model type {model_type!r}: pass `target_modules` (the module each FFN's "
                "input enters) and the `ffn_*` paths of its pieces."
            )
    matcher = SimpleNamespace(
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        target_parameters=None,
    )
    found: dict[str, FFNParts] = {}
    modules = dict(model.named_modules())
    tuner_layers = {n for n, m in modules.items() if isinstance(m, BaseTunerLayer)}
    for name in modules:
        inside_tuner_layer = any(name.startswith(t + ".") for t in tuner_layers)
        if not name or inside_tuner_layer or not check_target_module_exists(matcher, name):  # excluded: falsy too
            continue
        parent_name, _, entry = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        entry_layout = None if layout is None else dataclasses.replace(layout, entry=entry)
        found[name] = resolve_ffn(name, parent, entry, model_type, entry_layout)
    if not found:
        raise ValueError(f"No module of the model matches target_modules={target_modules!r}: no FFN found.")
    return found
