"""Experts: banks of N stacked subnetworks (`banks`; LoRA experts in `lora`), the dispatch that runs only the
chosen ones (`dispatch`), its table of exact strategies with the cost model that picks one (`strategies`), the
grouping of rows by expert (`grouping`), the grouped-matmul kernels (`kernels`) and the grouped strategy as one
autograd node (`fused`)."""

from .activations import ACTIVATIONS, activation_fn
from .banks import AdapterBank, EmbeddingBank, ExpertBank, MLPExpertBank, ModuleBank
from .dispatch import dispatch, expert_mlp
from .grouping import Grouping, combine_rows, count_assignments, gather_rows, group_by_expert, group_offsets
from .kernels import grouped_linear, grouped_mm_supported
from .lora import LoraBank
from .strategies import (
    GROUPED_OVERHEAD_IN_MACS,
    MOVE_COST_IN_MACS,
    STRATEGIES,
    ExpertMLPWeights,
    choose_strategy,
    dense_weights,
)

__all__ = [
    "ACTIVATIONS",
    "GROUPED_OVERHEAD_IN_MACS",
    "MOVE_COST_IN_MACS",
    "STRATEGIES",
    "AdapterBank",
    "EmbeddingBank",
    "ExpertBank",
    "ExpertMLPWeights",
    "Grouping",
    "LoraBank",
    "MLPExpertBank",
    "ModuleBank",
    "activation_fn",
    "choose_strategy",
    "combine_rows",
    "count_assignments",
    "dense_weights",
    "dispatch",
    "expert_mlp",
    "gather_rows",
    "group_by_expert",
    "group_offsets",
    "grouped_linear",
    "grouped_mm_supported",
]
