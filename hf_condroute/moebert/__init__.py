"""MoEBERT (Zuo et al. 2022) for any transformers model: neuron importance, the split of a dense FFN into
experts, the routed-FFN expert bank, and self-distillation (the PEFT model with adapters disabled is the dense
teacher). The PEFT tuner itself is `hf_condroute.RoutedFFNConfig`."""

from .bank import FFNSliceBank
from .convert import FFNConversion, match_importance, plan_conversion
from .importance import importance_scores
from .layout import FFN_LAYOUTS, FFNLayout, FFNParts, find_ffns
from .split import assign_neurons, check_split, default_expert_dim

_LAZY = {
    "DistillationTrainer": "distill",
    "distillation_loss": "distill",
    "hidden_state_loss": "distill",
    "logit_loss": "distill",
    "span_logit_loss": "distill",
    "teacher_outputs": "distill",
    "hidden_state_gap": "fidelity",
    "logit_gap": "fidelity",
}


def __getattr__(name):
    # distillation imports transformers.Trainer (and datasets): only when asked for, not on `import hf_condroute`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FFN_LAYOUTS",
    "DistillationTrainer",
    "FFNConversion",
    "FFNLayout",
    "FFNParts",
    "FFNSliceBank",
    "assign_neurons",
    "check_split",
    "default_expert_dim",
    "distillation_loss",
    "find_ffns",
    "hidden_state_gap",
    "hidden_state_loss",
    "importance_scores",
    "logit_gap",
    "logit_loss",
    "match_importance",
    "plan_conversion",
    "span_logit_loss",
    "teacher_outputs",
]
