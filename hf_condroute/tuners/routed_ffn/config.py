"""`RoutedFFNConfig`: each feed-forward network replaced by a routed mixture of slices of itself (MoEBERT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.config import PeftConfig

from ...moebert.split import check_shared
from ...routers.config import RoutingConfig
from ...routers.validation import Choice, Flag, Integer, Text, check_fields
from ..peft_types import ROUTED_FFN


@dataclass
class RoutedFFNConfig(RoutingConfig, PeftConfig):
    """Configuration of a [`RoutedFFNModel`]: MoEBERT (Zuo et al. 2022) for any model, as a PEFT method.

    Each targeted FFN becomes `num_experts` experts, each `expert_dim` of its neurons: the `shared_neurons` most
    important ones (by `importance`, from `hf_condroute.moebert.importance_scores`) in every expert, the others
    dealt round-robin from the most important down. A router picks `top_k` experts per token (or per example);
    only those run. The dense FFN stays in the model, frozen, so `disable_adapter()` gives the original model
    back exactly: the teacher of `hf_condroute.moebert.DistillationTrainer`.

    Args:
        expert_dim: neurons per expert; None: shared_neurons + (ffn_dim - shared_neurons) // num_experts, the
            largest size that uses every neuron once.
        shared_neurons: the most important neurons, in every expert.
        importance: {FFN module name: scores (ffn_dim,)} as `importance_scores` returns (names may carry extra
            leading components, e.g. `base_model.model.`), or a list of score tensors in model order. Used once,
            to build the experts; never written to adapter_config.json: each expert's neurons are saved with the
            adapter weights (`neuron_index`), and a loaded model needs no scores.
        init_weights: True: build the experts from the dense FFN, choosing neurons by `importance` (required).
            False: take the neurons in index order, no scores needed; saved configs say False, since loading
            overwrites the experts with the saved ones.
        target_modules: the modules each FFN's input enters, which the routed FFN replaces (BERT `intermediate`,
            T5 `DenseReluDense`, Llama `mlp`); None: the architecture default.
        ffn_in_proj / ffn_out_proj / ffn_activation / ffn_dropout: for other architectures, paths from the module
            that holds the FFN to its input projection (or [gate, up] for act(gate(x)) * up(x)), output projection,
            activation (or a transformers ACT2FN name) and the dropout on its activations. BERT's are
            ['intermediate.dense'], 'output.dense', 'intermediate.intermediate_act_fn', None.

    Routing defaults follow paper B's MoEBERT experiments: per-token routing, top_k=2, and `norm_topk_prob`
    (top-k weights summing to 1, so the output bias and scale match the dense FFN's).
    """

    num_experts: int = field(default=4, metadata={"check": Integer(1), "help": "Experts per FFN (MoEBERT: 4)."})
    top_k: int = field(
        default=2, metadata={"check": Integer(1), "help": "Experts each token (or example) runs through."}
    )
    routing_granularity: Literal["example", "token"] = field(
        default="token",
        metadata={
            "check": Choice(values=("example", "token")),
            "help": "`token` (default): one decision per token. `example`: one per sequence.",
        },
    )
    norm_topk_prob: bool = field(
        default=True,
        metadata={"check": Flag(), "help": "Top-k weights sum to 1 (paper B's Top-k: softmax over the top-k logits)."},
    )
    expert_dim: int | None = field(
        default=None,
        metadata={
            "check": Integer(1, optional=True),
            "help": "Neurons per expert; None: shared_neurons + (ffn_dim - shared_neurons) // num_experts.",
        },
    )
    shared_neurons: int = field(
        default=0, metadata={"check": Integer(0), "help": "The most important neurons, shared by every expert."}
    )
    importance: Any | None = field(
        default=None,
        repr=False,
        metadata={"help": "Neuron importance per FFN (`importance_scores`); used at conversion, not saved."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "check": Flag(),
            "help": "Build experts from the dense FFN by `importance`; False: index order (loading).",
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules each FFN's input enters (replaced by the routed FFN); None: architecture default."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave out."})
    ffn_in_proj: list[str] | None = field(
        default=None,
        metadata={
            "check": Text(many=True, optional=True),
            "help": "Input projection path(s) from the FFN's parent; [gate, up] when gated.",
        },
    )
    ffn_out_proj: str | None = field(
        default=None, metadata={"check": Text(optional=True), "help": "Output projection path from the FFN's parent."}
    )
    ffn_activation: str | None = field(
        default=None,
        metadata={
            "check": Text(optional=True),
            "help": "Activation module path from the FFN's parent, or a transformers ACT2FN name.",
        },
    )
    ffn_dropout: str | None = field(
        default=None,
        metadata={"check": Text(optional=True), "help": "Path of the dropout on the FFN's activations, if any."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a classifier head."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ROUTED_FFN
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.ffn_in_proj, str):
            self.ffn_in_proj = [self.ffn_in_proj]
        check_fields(self)
        if self.expert_dim is not None:
            check_shared(self.expert_dim, self.shared_neurons)
        if self.ffn_in_proj is not None:
            if not 1 <= len(self.ffn_in_proj) <= 2:
                raise ValueError(
                    f"ffn_in_proj names one input projection, or two ([gate, up]) for a gated FFN; "
                    f"got {self.ffn_in_proj}."
                )
            if self.ffn_out_proj is None or self.ffn_activation is None:
                raise ValueError("With ffn_in_proj, also give ffn_out_proj and ffn_activation.")
        elif self.ffn_out_proj is not None or self.ffn_activation is not None or self.ffn_dropout is not None:
            raise ValueError("ffn_out_proj/ffn_activation/ffn_dropout need ffn_in_proj too: give all the FFN's pieces.")
        if self.init_weights and self.importance is None:
            raise ValueError(
                "RoutedFFNConfig needs `importance` to build experts from the dense FFN: compute it with "
                "`hf_condroute.moebert.importance_scores(model, dataloader)` on the dense model and pass "
                "importance=scores. (init_weights=False skips it, taking neurons in index order: for loading saved "
                "experts.)"
            )
        if self.importance is not None:
            _check_importance(self.importance)
        self.check_routing_rules()  # the fields' own rules ran above

    def to_dict(self) -> dict:
        """The JSON-able config: importance scores are left out (each expert's neurons travel with the adapter
        weights), and `init_weights` is False so that loading does not ask for them."""
        importance, self.importance = self.importance, None
        try:
            out = super().to_dict()
        finally:
            self.importance = importance
        out["importance"] = None
        out["init_weights"] = False
        return out


def _check_importance(importance) -> None:
    if isinstance(importance, Mapping):
        values = list(importance.values())
    elif isinstance(importance, Sequence) and not isinstance(importance, str):
        values = list(importance)
    else:
        raise TypeError(
            f"importance must be a dict {{FFN module name: scores}} (as importance_scores returns) or a list of score "
            f"tensors in model order, got {type(importance).__name__}."
        )
    if not values:
        raise ValueError("importance is empty: it needs scores for every routed FFN.")
    for v in values:
        t = torch.as_tensor(v)
        if t.dim() != 1 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(
                f"Each importance entry must be a 1-D tensor of scores, one per FFN neuron; got shape {tuple(t.shape)} "
                f"and dtype {t.dtype}."
            )
