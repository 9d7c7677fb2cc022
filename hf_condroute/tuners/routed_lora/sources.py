"""`lora_experts`: experts started from existing PEFT LoRA checkpoints of the same base model.

Every source is read and checked against the model before the first module is replaced: it must be a plain LoRA
(no DoRA, no LoRA bias, no rank or alpha patterns) of the config's rank, adapt exactly the modules this config
targets, with the shapes of this base's layers. Each source's scaling travels into its expert's B (B times
source scaling / this config's scaling; nothing changes when the alphas are equal)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from peft.utils import PeftType
from peft.utils.save_and_load import load_peft_weights

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


@dataclass
class SourceLora:
    index: int
    path: str
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # module: (A (r, in), B (out, r))

    @property
    def label(self) -> str:
        return f"lora_experts[{self.index}] ({self.path!r})"


def read_source(index: int, path: str, r: int) -> SourceLora:
    label = f"lora_experts[{index}] ({path!r})"
    try:
        config = PeftConfig.from_pretrained(path)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"{label} is not a PEFT checkpoint ({err}). Give the folder or Hub id of a LoRA saved with save_pretrained "
            "(adapter_config.json and adapter_model.safetensors)."
        ) from None
    if config.peft_type != PeftType.LORA:
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(
            f"{label} is a {kind} adapter, not a LoRA: only PEFT LoRA checkpoints (peft_type LORA) can "
            "become LoRA experts."
        )
    if config.r != r:
        raise ValueError(
            f"{label} has rank r={config.r}, but this RoutedLoraConfig has r={r}: every expert has the config's rank. "
            f"Set r={config.r}, or use LoRAs of rank {r}."
        )
    unsupported = [
        name
        for name, on in (
            ("use_dora", getattr(config, "use_dora", False)),
            ("lora_bias", getattr(config, "lora_bias", False)),
            ("rank_pattern", bool(getattr(config, "rank_pattern", None))),
            ("alpha_pattern", bool(getattr(config, "alpha_pattern", None))),
        )
        if on
    ]
    if unsupported:
        raise ValueError(
            f"{label} uses {', '.join(unsupported)}, which LoRA experts do not have: use plain LoRAs (one rank and one "
            "alpha for every module, no DoRA, no bias)."
        )
    if config.modules_to_save:
        warnings.warn(
            f"{label} also trained modules_to_save {sorted(config.modules_to_save)}; they are not experts and are not "
            "loaded. Add them to this config's modules_to_save to train them here.",
            stacklevel=4,
        )
    scaling = config.lora_alpha / (r**0.5 if getattr(config, "use_rslora", False) else r)
    source = SourceLora(index, path, scaling)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_peft_weights(path, device="cpu").items():
        match = _LORA_KEY.match(key)
        if match is None:
            if "lora_" in key:
                raise ValueError(f"{label} has weights {key!r} that LoRA experts cannot take (only Linear targets).")
            continue
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{label} has an incomplete LoRA for {module}: it needs both lora_A and lora_B.")
        source.weights[module] = (ab["A"], ab["B"])
    return source


def plan_sources(config, targets: dict[str, tuple[int, int]]) -> list[SourceLora]:
    """Read every source of `config.lora_experts` and check it against `targets` {module name: (in, out)}."""
    sources = [read_source(i, path, config.r) for i, path in enumerate(config.lora_experts)]
    for source in sources:
        missing = sorted(set(targets) - set(source.weights))
        extra = sorted(set(source.weights) - set(targets))
        if missing or extra:
            what = []
            if missing:
                what.append(f"has no weights for {_some(missing)}, which this config targets")
            if extra:
                what.append(f"adapts {_some(extra)}, which this config does not target")
            raise ValueError(
                f"{source.label} {' and '.join(what)}. Use the same target_modules as the LoRAs (every source must "
                "adapt the same modules)."
            )
        for module, (a, b) in source.weights.items():
            in_features, out_features = targets[module]
            if tuple(a.shape) != (config.r, in_features) or tuple(b.shape) != (out_features, config.r):
                raise ValueError(
                    f"{source.label} does not fit this base model: its LoRA of {module} has lora_A {tuple(a.shape)} "
                    f"and lora_B {tuple(b.shape)}, but that layer needs ({config.r}, {in_features}) and "
                    f"({out_features}, {config.r}). Use LoRAs trained on this base model."
                )
    return sources


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
