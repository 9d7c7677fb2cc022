"""The FFN-to-experts conversion plan: which FFNs a `RoutedFFNConfig` targets and each expert's neurons, worked
out (and every error raised) before the model is touched."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..routers import build_router
from .layout import FFNParts, find_ffns, layout_from_fields
from .split import assign_neurons, default_expert_dim


@dataclass
class FFNConversion:
    parts: FFNParts
    neuron_index: torch.Tensor  # (num_experts, expert_dim)


def match_importance(importance, names: list[str], ffn_dims: list[int]) -> dict[str, torch.Tensor]:
    """{FFN name: scores} from a dict keyed by module names (matched on whole trailing components, so scores of
    the bare encoder fit a model with a head, and the reverse) or from a list in model order."""
    if not isinstance(importance, Mapping):
        scores = list(importance)
        if len(scores) != len(names):
            raise ValueError(
                f"importance has {len(scores)} entries but the model has {len(names)} routed FFNs ({names[0]} ...). "
                "Give one score tensor per FFN, in model order, or the dict importance_scores returns."
            )
        matched = dict(zip(names, scores))
    else:
        matched = {}
        for name in names:
            hits = [k for k in importance if k == name or name.endswith("." + k) or k.endswith("." + name)]
            if not hits:
                shown = ", ".join(list(importance)[:3]) + (", ..." if len(importance) > 3 else "")
                raise ValueError(
                    f"importance has no scores for the FFN {name} (it has {len(importance)} entries: {shown}). Compute "
                    "them with importance_scores(model, dataloader) on this model, before get_peft_model."
                )
            if len(hits) > 1:
                raise ValueError(f"importance has several entries that fit the FFN {name}: {hits}. Keep one.")
            matched[name] = importance[hits[0]]
    out = {}
    for (name, scores), dim in zip(matched.items(), ffn_dims):
        t = torch.as_tensor(scores).detach().float().reshape(-1).cpu()
        if t.numel() != dim:
            raise ValueError(
                f"importance for {name} has {t.numel()} scores but its FFN has {dim} neurons. Compute the scores on "
                "the model you convert."
            )
        out[name] = t
    return out


def plan_conversion(model: nn.Module, config) -> dict[str, FFNConversion]:
    """Every FFN `config` targets in `model`, with its experts' neurons. Raises before anything is replaced."""
    layout = layout_from_fields("", config.ffn_in_proj, config.ffn_out_proj, config.ffn_activation, config.ffn_dropout)
    found = find_ffns(
        model, config.target_modules, layout, config.exclude_modules, config.modules_to_save, allow_peft_layers=True
    )
    names = list(found)
    dims = [found[n].ffn_dim for n in names]
    if config.init_weights:
        scores = match_importance(config.importance, names, dims)
    else:
        scores = {n: torch.zeros(d) for n, d in zip(names, dims)}  # equal scores: neurons in index order
    # the router decides how many experts there are (`monolithic` has one whatever num_experts says)
    num_experts = build_router(config, found[names[0]].in_features, names[0]).num_experts
    plan = {}
    for name, parts in found.items():
        expert_dim = config.expert_dim or default_expert_dim(parts.ffn_dim, num_experts, config.shared_neurons)
        index = assign_neurons(scores[name], num_experts, expert_dim, config.shared_neurons, layer=name)
        plan[name] = FFNConversion(parts, index)
    return plan
