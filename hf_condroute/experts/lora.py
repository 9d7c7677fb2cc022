"""LoRA experts: N low-rank updates of one Linear, f_e(x) = (alpha / r) * B_e A_e dropout(x), as a thin form over
the two-matmul bank contract (identity activation, no biases), so every dispatch strategy of `expert_mlp` serves
them; per-token rows take a LoRA-specific path of their own (`per_token_lora`)."""

from __future__ import annotations

import torch
from torch import nn

from .activations import activation_fn
from .banks import MLPExpertBank
from .strategies import ExpertMLPWeights, choose_strategy

LORA_INITS = (True, False, "gaussian")


class LoraBank(MLPExpertBank):
    """N LoRA experts on a Linear's input x: A (N, in_features, r), B (N, r, out_features), scaling alpha / r.

    The dropout runs on the input rows before the experts (PEFT's LoRA: lora_B(lora_A(dropout(x))) * scaling).
    The scaling multiplies the combine weights, so it reaches the r hidden units of each row, not a full-size
    output: the same numbers as PEFT's output-side scaling whenever alpha / r is a power of two (1, 2, 0.5, ...),
    and otherwise equal up to one rounding.

    init_lora_weights, as PEFT's LoRA: True: A as nn.Linear's default (kaiming-uniform, bound 1/sqrt(in_features)),
    B zeros, so an untrained bank adds nothing; "gaussian": A ~ N(0, 1/r), B zeros; False: B random too
    (nn.Linear's default, bound 1/sqrt(r)).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
    ):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.r = num_experts, in_features, out_features, r
        self.scaling = lora_alpha / r
        self.act = activation_fn("identity")
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, in_features, r))
        self.lora_B = nn.Parameter(torch.empty(num_experts, r, out_features))
        self.reset_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights not in LORA_INITS:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}.")
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:  # kaiming_uniform_(a=sqrt(5)) on a (r, in) Linear weight: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / self.in_features**0.5
            nn.init.uniform_(self.lora_A, -bound, bound)
        if init_lora_weights is False:
            bound = 1.0 / self.r**0.5
            nn.init.uniform_(self.lora_B, -bound, bound)
        else:
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def load_expert(self, expert: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> None:
        """Expert `expert` from PEFT LoRA weights: lora_A.weight (r, in) and lora_B.weight (out, r); `scale` (the
        source's scaling over this bank's) multiplies B."""
        self.lora_A[expert].copy_(lora_A.t())
        b = lora_B.t().to(self.lora_B.dtype)
        self.lora_B[expert].copy_(b if scale == 1.0 else b * scale)

    def mlp_weights(self) -> ExpertMLPWeights:
        return ExpertMLPWeights(self.lora_A, None, self.lora_B, None)

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, merge: bool = False
    ) -> torch.Tensor:
        if merge:  # SMEAR merges A and B with the weights themselves; the scaling then applies once, to the output
            return super().forward(self.dropout(x), experts, weights, merge=True) * self.scaling
        x = self.dropout(x)
        if self.takes_per_token_path(x, experts):
            return per_token_lora(x, experts, weights * self.scaling, self.lora_A, self.lora_B)
        return super().forward(x, experts, weights * self.scaling)

    def takes_per_token_path(self, x: torch.Tensor, experts: torch.Tensor) -> bool:
        """Rows of one token each (per-token routing) run `per_token_lora`, unless the dispatch's cost model would
        group them by expert (many rows; taken with every slot filled, so no host sync is needed to decide)."""
        rows, width = experts.shape if experts.dim() == 2 else (0, 0)
        if rows == 0 or x.shape[0] != rows or x[0].numel() != x.shape[-1] or x.shape[-1] != self.in_features:
            return False  # the generic dispatch checks the shapes and handles empty inputs
        if torch.compiler.is_compiling():
            return True  # traced: no grouping, whose group sizes depend on the decision
        return choose_strategy(rows, 1, width, rows * width, self.mlp_weights()) != "grouped"

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, r={self.r}, "
            f"out_features={self.out_features}, scaling={self.scaling}"
        )


def per_token_lora(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> torch.Tensor:
    """sum_j weights[:, j] * B_{e_j} A_{e_j} x for rows x (R, 1, D) of one token each, experts and weights (R, k)
    (-1: an empty slot, which adds nothing and whose weight gets no gradient); A (N, D, r), B (N, r, O).

    A LoRA expert's hidden layer is r units, so every expert's is cheap: all N are computed for every row, each
    row's combine weights (scattered to an (R, N) table, repeats adding up) scale them, and one GEMM of depth N*r
    applies every B at once. Nothing is sorted or counted (no host sync): what is left is two GEMMs of width N*r,
    as one LoRA of rank N*r would run. The first product is one GEMM against a (D, N*r) copy of A; below r rows,
    a batched GEMM per expert on the stacked A instead (it copies x N times: R*N*D values, fewer than A's D*N*r).
    With fewer slots than experts (R * k < N: decoding one sequence) only the chosen experts' A and B are gathered,
    which reads less of them."""
    rows, k = experts.shape
    n, d, r = lora_A.shape
    flat = x.reshape(rows, d)
    if rows * k < n:  # fewer slots than experts (decoding one sequence): gather only the chosen experts
        safe = experts.clamp(min=0).reshape(-1)
        w = weights.to(x.dtype).masked_fill(experts < 0, 0.0).view(rows, k, 1, 1)
        hidden = torch.matmul(flat.view(rows, 1, 1, d), lora_A.index_select(0, safe).view(rows, k, d, r)) * w
        b = lora_B.index_select(0, safe).view(rows, k * r, -1)
        return torch.bmm(hidden.view(rows, 1, k * r), b).view(*x.shape[:-1], b.shape[-1])
    # (R, N + 1): column 0 takes the empty slots (expert -1) and is cut off, so they add nothing, with no sync
    table = x.new_zeros(rows, n + 1).scatter_add(1, experts + 1, weights.to(x.dtype))[:, 1:]
    if rows < r:  # the batched GEMM broadcasts x to (N, R, D): cheaper than A's (D, N*r) copy only below r rows
        hidden = torch.matmul(flat, lora_A) * table.t().unsqueeze(-1)  # (N, R, r)
        hidden = hidden.transpose(0, 1).reshape(rows, n * r)
    else:
        hidden = flat @ lora_A.permute(1, 0, 2).reshape(d, n * r)  # (R, N*r)
        hidden = (hidden.view(rows, n, r) * table.unsqueeze(-1)).view(rows, n * r)
    out = hidden @ lora_B.reshape(n * r, lora_B.shape[-1])
    return out.view(*x.shape[:-1], out.shape[-1])
