"""Dispatch: run only the chosen experts on their rows and combine the weighted outputs per row.

`expert_mlp` is the path of two-matmul experts (plain or gated): it checks the decision, does the call's one
host sync (the counts that decide the strategy and the group sizes) and hands the rows to the cheapest exact
strategy of `strategies.STRATEGIES`. `dispatch` runs experts of any other shape, one call per non-empty expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .grouping import combine_rows, count_assignments, gather_rows, group_by_expert
from .strategies import STRATEGIES, ExpertMLPWeights, choose_strategy, dense_weights


def _zero_output(x: torch.Tensor, out_features: int, params) -> torch.Tensor:
    # zeros that still reach every parameter, so DDP sees no unused parameter when no row is routed
    anchor = sum(t.sum() for t in params) * 0
    return x.new_zeros(*x.shape[:-1], out_features) + anchor.to(x.dtype)


def expert_mlp(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    mlp: ExpertMLPWeights,
    act: Callable[[torch.Tensor], torch.Tensor],
    strategy: str | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    merge: bool = False,
) -> torch.Tensor:
    """sum_j weights[:, j] * f_{experts[:, j]}(x) for rows x (R, ..., D), experts and weights (R, k) (-1: empty slot);
    with `merge`, f(x; sum_j weights[:, j] * theta_{experts[:, j]}) instead (SMEAR's merged expert).

    `act` is the nonlinearity (on the gate's pre-activation for gated experts), `post` what follows it on the
    hidden units (a dropout). `strategy` forces one of `STRATEGIES` (for tests and benchmarks; 'single' only where
    every row has the same one expert); None picks the cheapest."""
    mlp.check()
    num_experts, d, _ = mlp.w1.shape
    if x.shape[-1] != d:
        raise ValueError(f"The experts take {d} input features, but the rows have {x.shape[-1]}.")
    if experts.dim() != 2 or experts.shape[0] != x.shape[0] or weights.shape != experts.shape:
        raise ValueError(
            f"experts and weights must both have shape (rows, k) with rows = {x.shape[0]} (x's first dimension); "
            f"got experts {tuple(experts.shape)} and weights {tuple(weights.shape)}."
        )
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"Unknown dispatch strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}.")
    if merge != (strategy == "merged") and strategy is not None:
        raise ValueError("strategy='merged' computes the merged expert: use it with merge=True, and only then.")
    out_features = mlp.w2.shape[2]
    # no reshape of a 3-D x: its gradient would then be a view, which autograd cannot accumulate in place
    seq = x if x.dim() == 3 else x.reshape(x.shape[0], -1, d)  # (R, T, D)
    rows, length, width = seq.shape[0], seq.shape[1], experts.shape[1]

    def hidden(pre: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        h = act(pre) if gate is None else act(gate) * pre
        return post(h) if post is not None else h

    if torch.compiler.is_compiling():
        # traced: no host sync and no shape that depends on the decision, so only the static strategies (empty
        # slots weigh 0); `grouped`'s group sizes would break the graph and recompile as the counts change
        weights = weights.to(x.dtype).masked_fill(experts < 0, 0.0)
        if merge:
            strategy = "merged"
        elif strategy not in ("dense", "per_row"):
            strategy = choose_strategy(rows, length, width, rows * width, mlp, static=True)
        return STRATEGIES[strategy](seq, experts, weights, mlp, hidden, None).reshape(*x.shape[:-1], out_features)
    counted = count_assignments(experts, num_experts)
    empty, counts = counted
    assignments = rows * width - empty
    if assignments == 0 or length == 0:
        return _zero_output(x, out_features, mlp.parameters())
    weights = weights.to(x.dtype)
    if empty:  # an empty slot's weight is exactly 0 and gets no gradient, whatever the router put there
        weights = weights.masked_fill(experts < 0, 0.0)
    one_expert = width == 1 and not empty and counts.count(0) == num_experts - 1
    if strategy == "single" and not one_expert:
        raise ValueError(
            "strategy='single' needs every row to have exactly one slot, all naming the same expert; "
            "leave strategy=None to pick one that fits this decision."
        )
    if merge:
        strategy = "merged"
    elif strategy is None:
        strategy = "single" if one_expert else choose_strategy(rows, length, width, assignments, mlp)

    out = STRATEGIES[strategy](seq, experts, weights, mlp, hidden, counted)
    return out.reshape(*x.shape[:-1], out_features)


def dispatch(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    out_features: int,
    expert_forward: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Experts of any shape: run expert_forward(e, rows) once per non-empty expert on the rows routed to it
    (rows (n_e, ...) in x's layout) and sum the weighted outputs back per row. Two-matmul experts should use
    `expert_mlp`, which is faster."""
    if torch.compiler.is_compiling():  # traced: every expert on every row, weighted (no shape depends on the decision)
        table = dense_weights(experts, weights.masked_fill(experts < 0, 0.0), num_experts).to(x.dtype)
        shape = (-1, *([1] * (x.dim() - 1)))
        return sum(expert_forward(e, x) * table[:, e].view(shape) for e in range(num_experts))
    counted = count_assignments(experts, num_experts)
    if counted[0] == experts.numel():
        # an expert run on no rows, so that the output still reaches the experts' parameters
        return _zero_output(x, out_features, [expert_forward(0, x[:0])])
    g = group_by_expert(experts, weights, num_experts, counted)
    grouped = gather_rows(x, g)
    outputs = [expert_forward(e, chunk) for e, chunk in enumerate(grouped.split(g.counts)) if g.counts[e] > 0]
    y = torch.cat(outputs) * g.weights.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return combine_rows(y, g, x.shape[0])
