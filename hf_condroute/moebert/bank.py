"""`FFNSliceBank`: N experts, each a slice of a dense FFN's neurons, stacked for the core's dispatch: plain and gated
FFNs alike are two-matmul experts (`expert_mlp`, which picks the fastest exact strategy)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..experts import ExpertMLPWeights, MLPExpertBank
from ..experts.quantized import dequantized_weight
from .layout import FFNParts


class FFNSliceBank(MLPExpertBank):
    """Expert e computes dropout(act(x @ wi[e] + bi[e])) @ wo[e] + bo[e], or with a gated FFN
    dropout(act(x @ wi_gate[e] + bi_gate[e]) * (x @ wi[e] + bi[e])) @ wo[e] + bo[e].

    wi, wi_gate: (N, D, E); wo: (N, E, D_out); biases (N, E) and (N, D_out), or None where the FFN has none.
    Every expert carries the output bias, so with combine weights summing to 1 the bias is added once.
    `neuron_index` (N, E) records which dense neurons each expert started from (saved with the adapter).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        expert_dim: int,
        out_features: int,
        activation: Callable[[torch.Tensor], torch.Tensor],
        gated: bool = False,
        in_bias: bool = True,
        out_bias: bool = True,
        dropout: nn.Module | None = None,
    ):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.expert_dim, self.gated = expert_dim, gated
        # own copies: the bank must not share module objects with the dense FFN it replaces
        self.act = copy.deepcopy(activation) if isinstance(activation, nn.Module) else activation
        self.dropout = copy.deepcopy(dropout) if dropout is not None else None
        self.post = self.dropout  # on the hidden units, after the activation (and the gate's product)
        n, d, e = num_experts, in_features, expert_dim
        self.wi = nn.Parameter(torch.zeros(n, d, e))
        self.bi = nn.Parameter(torch.zeros(n, e)) if in_bias else None
        self.wi_gate = nn.Parameter(torch.zeros(n, d, e)) if gated else None
        self.bi_gate = nn.Parameter(torch.zeros(n, e)) if gated and in_bias else None
        self.wo = nn.Parameter(torch.zeros(n, e, out_features))
        self.bo = nn.Parameter(torch.zeros(n, out_features)) if out_bias else None
        self.register_buffer("neuron_index", torch.zeros(n, e, dtype=torch.long))

    @classmethod
    def from_ffn(cls, parts: FFNParts, neuron_index: torch.Tensor) -> FFNSliceBank:
        """A bank whose expert e holds the dense FFN's neurons `neuron_index[e]`. Quantized projections (a 4-bit or
        8-bit base) are dequantized: the experts are trainable floating-point copies of their slices."""
        weight = dequantized_weight(parts.in_proj[-1])
        bank = cls(
            neuron_index.shape[0],
            parts.in_features,
            neuron_index.shape[1],
            parts.out_features,
            parts.activation,
            gated=parts.gated,
            in_bias=parts.in_proj[-1].bias is not None,
            out_bias=parts.out_proj.bias is not None,
            dropout=parts.dropout,
        )
        if bank.wi.device.type != "meta":  # on meta (low_cpu_mem_usage) the saved weights are loaded afterwards
            bank.to(device=weight.device, dtype=weight.dtype)
            bank.copy_slices(parts, neuron_index)
        return bank

    @torch.no_grad()
    def copy_slices(self, parts: FFNParts, neuron_index: torch.Tensor) -> None:
        idx = neuron_index.to(self.wi.device)
        up, out = parts.in_proj[-1], parts.out_proj
        # nn.Linear keeps weight (out, in): rows of the input projection, columns of the output projection
        self.wi.copy_(dequantized_weight(up)[idx].transpose(1, 2))
        if self.bi is not None:
            self.bi.copy_(up.bias[idx])
        if self.gated:
            gate = parts.in_proj[0]
            self.wi_gate.copy_(dequantized_weight(gate)[idx].transpose(1, 2))
            if self.bi_gate is not None:
                self.bi_gate.copy_(gate.bias[idx])
        self.wo.copy_(dequantized_weight(out).t()[idx])
        if self.bo is not None:
            self.bo.copy_(out.bias.expand(self.num_experts, -1))
        self.neuron_index.copy_(idx)

    def mlp_weights(self) -> ExpertMLPWeights:
        return ExpertMLPWeights(self.wi, self.bi, self.wo, self.bo, self.wi_gate, self.bi_gate)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, expert_dim={self.expert_dim}, "
            f"out_features={self.out_features}, gated={self.gated}"
        )
