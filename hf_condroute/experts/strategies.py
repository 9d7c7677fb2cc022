"""The exact ways of running two-matmul experts on routed rows, as one table `STRATEGIES = {name: fn}`, and the
cost model that picks between them (`choose_strategy`). A new kernel (a fused CUDA path, a compiled CPU path) is
one entry here and one exactness test in tests/test_dispatch.py.

Every strategy computes sum_j w_j f_{e_j}(x) for rows `seq` (R, T, D) with

    f_e(x) = post(act(x @ w1[e] + b1[e])) @ w2[e] + b2[e]                            (plain)
    f_e(x) = post(act(x @ w_gate[e] + b_gate[e]) * (x @ w1[e] + b1[e])) @ w2[e] + b2[e]   (gated, GLU)

`post` (dropout, or nothing) runs on the hidden activations; the combine weight multiplies them too, never the
output, and the weighted output bias is added inside a GEMM or in place: routing adds no full-size temporary.
Each strategy takes (seq, experts, weights, mlp, hidden, counted), where `hidden(pre, gate_pre)` applies the
activation (and `post`), and `counted` is `count_assignments`' result (the dispatch's one host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fused import grouped_expert_mlp
from .grouping import group_by_expert

# Cost model, in multiply-adds: moving one value through memory (a gather, or its backward) costs about
# MOVE_COST_IN_MACS; the grouped strategy's fixed work (sorting, permutations, one launch per expert) about
# GROUPED_OVERHEAD_IN_MACS (~1 ms of one CPU core). Rough figures measured on CPU; they only choose
# between exact strategies, never change a result.
MOVE_COST_IN_MACS = 16.0
GROUPED_OVERHEAD_IN_MACS = 16e6

Hidden = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class ExpertMLPWeights:
    """Stacked weights of N two-matmul experts (see the module docstring); `w_gate`/`b_gate` make them gated."""

    w1: torch.Tensor  # (N, D, H)
    b1: torch.Tensor | None  # (N, H)
    w2: torch.Tensor  # (N, H, O)
    b2: torch.Tensor | None  # (N, O)
    w_gate: torch.Tensor | None = None  # (N, D, H)
    b_gate: torch.Tensor | None = None  # (N, H)

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.w1, self.b1, self.w2, self.b2, self.w_gate, self.b_gate) if t is not None]

    def check(self) -> None:
        n, d, h = self.w1.shape
        if self.w2.shape[:2] != (n, h):
            raise ValueError(f"w2 must have shape (N={n}, H={h}, O), got {tuple(self.w2.shape)}.")
        if self.b1 is not None and self.b1.shape != (n, h):
            raise ValueError(f"b1 must have shape ({n}, {h}), got {tuple(self.b1.shape)}.")
        if self.b2 is not None and self.b2.shape != (n, self.w2.shape[2]):
            raise ValueError(f"b2 must have shape ({n}, {self.w2.shape[2]}), got {tuple(self.b2.shape)}.")
        if self.w_gate is not None and self.w_gate.shape != self.w1.shape:
            raise ValueError(f"w_gate must have w1's shape {tuple(self.w1.shape)}, got {tuple(self.w_gate.shape)}.")
        if self.b_gate is not None and (self.w_gate is None or self.b_gate.shape != (n, h)):
            raise ValueError(f"b_gate needs w_gate and shape ({n}, {h}), got {tuple(self.b_gate.shape)}.")


def choose_strategy(
    rows: int, length: int, width: int, assignments: int, mlp: ExpertMLPWeights, static: bool = False
) -> str:
    """'dense', 'per_row' or 'grouped': the cheapest in multiply-adds plus the cost of moving values; with `static`
    (under torch.compile), 'dense' or 'per_row', whose shapes do not depend on the decision.

    rows R of length T, `width` slots per row of which `assignments` are filled. `per_row` moves each
    slot's weights twice (the gather, the gradient's index_add), `grouped` each assigned row twice (gather
    and combine, forward and backward alike)."""
    n, d, h = mlp.w1.shape
    o = mlp.w2.shape[2]
    first = 2 if mlp.gated else 1  # first-layer matmuls
    macs_per_token = h * (first * d + o)
    moved = h * (first * d + o)  # weights a row gathers per slot
    dense = rows * length * n * macs_per_token + MOVE_COST_IN_MACS * first * n * d * h  # (a copy of W1)
    per_row = rows * width * (length * macs_per_token + 2 * MOVE_COST_IN_MACS * moved)
    grouped = assignments * length * (macs_per_token + 2 * MOVE_COST_IN_MACS * (d + o)) + GROUPED_OVERHEAD_IN_MACS
    if static:  # one comparison (dynamo cannot take min() of symbolic costs when the shapes are dynamic)
        return "dense" if dense <= per_row else "per_row"
    return min((dense, "dense"), (per_row, "per_row"), (grouped, "grouped"))[1]


def dense_weights(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(R, N): each row's combine weight for every expert (repeats add up; empty slots already weigh 0)."""
    return weights.new_zeros(experts.shape[0], num_experts).scatter_add(1, experts.clamp(min=0), weights)


def _weighted_output_bias(b2: torch.Tensor | None, experts: torch.Tensor, weights: torch.Tensor):
    """sum_j w_j b2[e_j] per row: (R, O), or None without a bias."""
    return None if b2 is None else dense_weights(experts, weights, b2.shape[0]) @ b2


def single(seq, experts, weights, mlp: ExpertMLPWeights, hidden: Hidden, counted):
    """Every row on the same one expert: 3-D @ 2-D matmuls fold into single GEMMs over all R*T tokens."""
    expert = next(e for e, c in enumerate(counted[1]) if c)

    def first(w, b):
        h = torch.matmul(seq, w[expert])
        return h.add_(b[expert]) if b is not None else h

    gate = first(mlp.w_gate, mlp.b_gate) if mlp.gated else None
    h = hidden(first(mlp.w1, mlp.b1), gate) * weights.view(-1, 1, 1)  # weights (R, 1): the row's combine weight
    out = torch.matmul(h, mlp.w2[expert])
    if mlp.b2 is not None:
        out.add_(weights.view(-1, 1, 1) * mlp.b2[expert])  # in place: the matmul's backward does not need out
    return out


def dense(seq, experts, weights, mlp: ExpertMLPWeights, hidden: Hidden, counted):
    """All N experts as one MLP of hidden size N*H; rows weight the hidden units of each expert."""
    rows, length, d = seq.shape
    n, _, h = mlp.w1.shape
    dense_w = dense_weights(experts, weights, n)
    flat = seq.reshape(rows * length, d)

    def first(w, b):
        w_all = w.permute(1, 0, 2).reshape(d, n * h)
        return torch.addmm(b.reshape(n * h), flat, w_all) if b is not None else flat @ w_all

    gate = first(mlp.w_gate, mlp.b_gate) if mlp.gated else None
    act = hidden(first(mlp.w1, mlp.b1), gate).view(rows, length, n, h) * dense_w.view(rows, 1, n, 1)
    # 3-D @ 2-D: matmul folds it into one GEMM and returns a tensor (not a view) that add_ may modify
    out = torch.matmul(act.view(rows, length, n * h), mlp.w2.reshape(n * h, -1))
    if mlp.b2 is not None:
        out.add_((dense_w @ mlp.b2).unsqueeze(1))  # in place: the matmul's backward does not need its output
    return out


def per_row(seq, experts, weights, mlp: ExpertMLPWeights, hidden: Hidden, counted):
    """Each row runs with its own gathered weights: one batched GEMM per slot down, one of width k*H up."""
    rows = seq.shape[0]
    h = mlp.w1.shape[2]
    width = experts.shape[1]
    safe = experts.clamp(min=0)

    def first(w, b, e):
        wg = w.index_select(0, e)  # (R, D, H)
        return torch.bmm(seq, wg) if b is None else torch.baddbmm(b.index_select(0, e).unsqueeze(1), seq, wg)

    parts = []
    for j in range(width):
        e = safe[:, j]
        gate = first(mlp.w_gate, mlp.b_gate, e) if mlp.gated else None
        parts.append(hidden(first(mlp.w1, mlp.b1, e), gate))
    act = parts[0] if width == 1 else torch.cat(parts, dim=-1)  # (R, T, k*H)
    scale = weights.repeat_interleave(h, dim=1) if width > 1 else weights
    act = act * scale.unsqueeze(1)
    w2 = mlp.w2.index_select(0, safe.reshape(-1)).view(rows, width * h, -1)  # (R, k*H, O)
    bias = _weighted_output_bias(mlp.b2, experts, weights)
    return torch.bmm(act, w2) if bias is None else torch.baddbmm(bias.unsqueeze(1), act, w2)


def grouped(seq, experts, weights, mlp: ExpertMLPWeights, hidden: Hidden, counted):
    """Rows sorted by expert (once, shared by every matmul), each expert once on its contiguous group: gathered,
    multiplied and combined chunk by chunk in one autograd node (`fused`), so no full-size sorted copy is made."""
    length = seq.shape[1]
    g = group_by_expert(experts, weights, mlp.w1.shape[0], counted)
    token_weights = g.weights.repeat_interleave(length) if length > 1 else g.weights
    return grouped_expert_mlp(seq, token_weights, g, hidden, mlp, length)


def merged(seq, experts, weights, mlp: ExpertMLPWeights, hidden: Hidden, counted):
    """SMEAR: each row's weights average the experts' parameters, and the one merged expert runs on the row:
    f(x; sum_i w_i theta_i), which differs from the mixture of outputs for nonlinear experts. The merge is one
    (R, N) @ (N, |theta|) matmul per tensor; the row then runs as `per_row` does, with one slot."""
    rows = seq.shape[0]
    n = mlp.w1.shape[0]
    dense_w = dense_weights(experts, weights, n)  # (R, N)

    def merge(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (dense_w @ t.reshape(n, -1)).view(rows, *t.shape[1:])

    def first(w, b):
        w, b = merge(w), merge(b)
        return torch.bmm(seq, w) if b is None else torch.baddbmm(b.unsqueeze(1), seq, w)

    gate = first(mlp.w_gate, mlp.b_gate) if mlp.gated else None
    h = hidden(first(mlp.w1, mlp.b1), gate)
    w2, b2 = merge(mlp.w2), merge(mlp.b2)
    return torch.bmm(h, w2) if b2 is None else torch.baddbmm(b2.unsqueeze(1), h, w2)


# name -> strategy; `single` only applies where every row has one slot naming the same expert, `merged` is asked
# for by routers that average parameters (never chosen by the cost model: it computes a different function)
STRATEGIES: dict[str, Callable] = {
    "single": single,
    "dense": dense,
    "per_row": per_row,
    "grouped": grouped,
    "merged": merged,
}
