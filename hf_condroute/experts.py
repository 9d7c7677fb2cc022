"""Expert banks: N subnetworks of one shape whose parameters are stacked along a leading expert dimension,
and the dispatch that runs only the chosen experts.

A bank maps rows x (R, T, D) (an example's T tokens, or T = 1 for a token or a vector) and a decision
(experts (R, k), -1 for an empty slot; weights (R, k)) to sum_j weights[:, j] * f_{experts[:, j]}(x).
Stacked parameters keep one gradient tensor per bank whatever the routing, and every expert takes part in
the graph, so DDP never sees an unused parameter.

Dispatch API (for anyone adding a bank)
---------------------------------------
Two-matmul experts, f_e(x) = act(x @ W1[e] + b1[e]) @ W2[e] + b2[e] (bottleneck adapters, slices of a
feed-forward layer), subclass `MLPExpertBank`: set `self.act` and implement `mlp_weights()` returning
`ExpertMLPWeights(w1 (N, D, H), b1 (N, H) | None, w2 (N, H, O), b2 (N, O) | None)`, built from the bank's
own parameters (a view or a cheap concatenation: it is called once per forward, inside autograd).
`MLPExpertBank.forward` hands them to `expert_mlp`, which owns the grouped computation and picks, per call,
the cheapest of three exact strategies with a cost model (`choose_strategy`), after one shortcut:

- "single": every row has one slot and all of them name the same expert (the `monolithic` router, a
  tag router on a one-task batch): that expert runs as a plain MLP on all rows, two GEMMs at the full
  batch size with no gather at all, as an unrouted adapter would.
- "dense": every row uses (almost) every expert (the `softmax` router): all experts run as one wide MLP,
  x @ [W1_1 .. W1_N] then (act(.) * weights) @ [W2_1; ..; W2_N]: two large matmuls and no gathers.
- "per_row": rows are long (per-example routing: the row is a whole sequence, T >= H): each row gathers
  its experts' weights and all rows run as one batched matmul (`baddbmm`, bias fused: cuBLAS' strided
  batched GEMM on CUDA, MKL's on CPU); the k chosen experts of a row form one MLP of hidden size k*H, so
  the sum over the k slots happens inside the second matmul.
  The activations never move: only weights (R*k*H*(D+O) values, fewer than the R*T*(D+O) of the rows).
- "grouped": short rows (per-token routing): assignments are sorted by expert, the rows gathered into
  expert order and each expert runs once on its contiguous group with `torch.nn.functional.grouped_mm`
  where this torch, device and dtype support it (checked once by a small forward+backward probe), else
  one matmul per expert. When every row has exactly one assignment the gather and the combine are
  permutations (their backward is a gather too, not a zero-filled index_add).

In all of them the combine weight multiplies the small hidden activation (act(.) * w), never the output,
and the weighted output bias (sum_j w_j b2[e_j] per row) is added inside the GEMM (`baddbmm`) or in place:
routing adds no full-size temporary.
Weight gradients land in the stacked parameters directly (grouped_mm's backward, or one index_add per
gathered tensor): no per-expert allocation of full-size gradients. A call does one host sync (the counts
that decide the strategy and the group sizes); no Python work grows with the batch or the sequence.

Experts of any other shape use `dispatch(x, experts, weights, num_experts, out_features, expert_forward)`
with a per-expert callable: the same sorting and combine, one call per non-empty expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

# Cost model, in multiply-adds: moving one value through memory (a gather, or its backward) costs about
# MOVE_COST_IN_MACS; the grouped strategy's fixed work (sorting, permutations, one launch per expert) about
# GROUPED_OVERHEAD_IN_MACS (~1 ms of one CPU core). Rough figures measured on CPU; they only choose
# between exact strategies, never change a result.
MOVE_COST_IN_MACS = 16.0
GROUPED_OVERHEAD_IN_MACS = 16e6


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# ----- grouping -------------------------------------------------------------------------------------


@dataclass
class Grouping:
    """Assignments (row, slot) with an expert, in expert order.

    rows: (A,) source row of each assignment; weights: (A,) its combine weight; counts: assignments per
    expert (host list). inverse: when every row has exactly one assignment, `rows` is a permutation and this
    is its inverse (the combine is then a permutation too); else None.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    counts: list[int]
    inverse: Optional[torch.Tensor]

    @property
    def experts(self) -> torch.Tensor:
        """(A,) the expert of each assignment: in expert order, expert e repeated counts[e] times."""
        counts = torch.tensor(self.counts, device=self.rows.device)
        return torch.arange(len(self.counts), device=self.rows.device).repeat_interleave(counts)

    @property
    def offsets(self) -> torch.Tensor:
        """(N,) int32 cumulative counts on the device: where each expert's group ends."""
        return group_offsets(self.counts, self.rows.device)


def group_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """Where each group ends, as grouped_mm's `offs` wants it: int32 cumulative counts."""
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def count_assignments(experts: torch.Tensor, num_experts: int) -> tuple[int, list[int]]:
    """(empty slots, assignments per expert): the one host sync of a dispatch."""
    counts = torch.bincount(experts.reshape(-1) + 1, minlength=num_experts + 1).tolist()
    if len(counts) > num_experts + 1:
        raise ValueError(
            f"The routing decision names expert {len(counts) - 2}, but the bank has {num_experts} experts "
            f"(0..{num_experts - 1}, -1 for an empty slot). Build the router and the bank with the same num_experts."
        )
    return counts[0], counts[1:]


def group_by_expert(
    experts: torch.Tensor, weights: torch.Tensor, num_experts: int, counted: Optional[tuple[int, list[int]]] = None
) -> Grouping:
    """Flatten (R, k) assignments, drop empty slots (-1) and sort by expert (stable: rows keep their order)."""
    rows_total, k = experts.shape
    empty, counts = counted if counted is not None else count_assignments(experts, num_experts)
    flat = experts.reshape(-1)
    key = flat.masked_fill(flat < 0, num_experts) if empty else flat  # empty slots sort last, then are cut
    order = key.argsort(stable=True)[: flat.numel() - empty]
    rows = order // k if k > 1 else order
    inverse = None
    if k == 1 and empty == 0:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(rows_total, device=order.device)
    return Grouping(rows=rows, weights=weights.reshape(-1).index_select(0, order), counts=counts, inverse=inverse)


class _PermuteRows(torch.autograd.Function):
    """x[index] for a permutation `index`; the backward is the inverse permutation, a gather, where
    index_select's backward would zero-fill a full-size buffer and scatter-add into it."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, g: Grouping) -> torch.Tensor:
    """The rows of x in expert order, one per assignment."""
    if g.inverse is not None:
        return _PermuteRows.apply(x, g.rows, g.inverse)
    return x.index_select(0, g.rows)


def combine_rows(y: torch.Tensor, g: Grouping, num_rows: int) -> torch.Tensor:
    """Sum the (already weighted) outputs of the assignments back per row."""
    if g.inverse is not None:
        return _PermuteRows.apply(y, g.inverse, g.rows)
    return y.new_zeros(num_rows, *y.shape[1:]).index_add_(0, g.rows, y)


# ----- grouped matmul -------------------------------------------------------------------------------

_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs here, forward and backward (probed once per device
    and dtype: support differs between torch versions, CPUs and GPU generations)."""
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                ok = _probe_grouped_mm(device, dtype)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    a, b, bias, scale = rand(24, 32), rand(3, 32, 16), rand(3, 16), rand(24)
    counts = [8, 0, 16]  # an empty group too
    offs = group_offsets(counts, device)
    with torch.enable_grad():
        out = _GroupedLinear.apply(a, b, offs, counts, bias, scale)
        grads = torch.autograd.grad(out.float().sum(), (a, b, bias, scale))
        ref = _looped_linear(a, b, counts, bias, scale)
        ref_grads = torch.autograd.grad(ref.float().sum(), (a, b, bias, scale))
    pairs = [(out, ref), *zip(grads, ref_grads)]
    return all(torch.allclose(x.float(), y.float(), rtol=2e-2, atol=2e-2) for x, y in pairs)


def _segments(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


class _GroupedLinear(torch.autograd.Function):
    """F.grouped_mm(a, b, offs), plus row_scale[i] * bias[e] added in place to each row i of group e.

    Its own backward because grouped_mm's refuses gradients that are not dense (e.g. from `out.sum()`),
    and so that the bias needs no (rows, H) buffer: it is added group by group (a loop over experts, not
    rows)."""

    @staticmethod
    def forward(ctx, a, b, offs, counts, bias, row_scale):
        out = F.grouped_mm(a, b, offs=offs)
        if bias is not None:
            for e, start, end in _segments(counts):
                if row_scale is None:
                    out[start:end].add_(bias[e])
                else:
                    out[start:end].addr_(row_scale[start:end], bias[e])
        ctx.save_for_backward(a, b, offs, bias, row_scale)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs, bias, row_scale = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = grad_bias = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_a = F.grouped_mm(grad, b.transpose(-2, -1), offs=offs)
        if ctx.needs_input_grad[1]:
            grad_b = F.grouped_mm(a.transpose(-2, -1), grad, offs=offs)
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = torch.zeros_like(bias)
            for e, start, end in _segments(ctx.counts):
                if row_scale is None:
                    torch.sum(grad[start:end], 0, out=grad_bias[e])
                else:
                    torch.mv(grad[start:end].t(), row_scale[start:end], out=grad_bias[e])
        if row_scale is not None and ctx.needs_input_grad[5]:
            grad_scale = torch.zeros_like(row_scale)
            for e, start, end in _segments(ctx.counts):
                torch.mv(grad[start:end], bias[e], out=grad_scale[start:end])
        return grad_a, grad_b, None, None, grad_bias, grad_scale


def _looped_linear(a, b, counts, bias=None, row_scale=None):
    """The same as _GroupedLinear with one matmul per non-empty group (where grouped_mm is unsupported)."""
    per_expert = b.unbind(0)  # one backward node stacks the per-expert gradients
    parts = []
    for e, start, end in _segments(counts):
        part = a[start:end] @ per_expert[e]
        if bias is not None:
            part = part + bias[e] if row_scale is None else torch.addr(part, row_scale[start:end], bias[e])
        parts.append(part)
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[2])


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # grouped GEMM kernels need 16-byte aligned row strides
    size = a.element_size()
    return (
        a.dtype == b.dtype
        and a.shape[-1] * size % 16 == 0
        and b.shape[-1] * size % 16 == 0
        and grouped_mm_supported(a.device, a.dtype)
    )


def grouped_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    counts: list[int],
    bias: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a (M, D), its rows grouped by expert (group e has counts[e] rows and ends at offsets[e]), times
    b[e] (N, D, H) -> (M, H), plus bias[e] (N, H) on each row of group e, times row_scale (M,) if given.

    One `torch.nn.functional.grouped_mm` where this device and dtype support it (on CPU it runs each group
    as one large GEMM; on CUDA it needs bf16 and a recent GPU), else one matmul per non-empty group."""
    if bias is None:
        row_scale = None  # it scales only the bias
    if a.shape[0] > 0 and _grouped_mm_fits(a, b):
        return _GroupedLinear.apply(a.contiguous(), b, offsets, counts, bias, row_scale)
    return _looped_linear(a, b, counts, bias, row_scale)


# ----- two-matmul experts ---------------------------------------------------------------------------


@dataclass
class ExpertMLPWeights:
    """Stacked weights of N experts f_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]."""

    w1: torch.Tensor  # (N, D, H)
    b1: Optional[torch.Tensor]  # (N, H)
    w2: torch.Tensor  # (N, H, O)
    b2: Optional[torch.Tensor]  # (N, O)

    def check(self) -> None:
        n, d, h = self.w1.shape
        if self.w2.shape[:2] != (n, h):
            raise ValueError(f"w2 must have shape (N={n}, H={h}, O), got {tuple(self.w2.shape)}.")
        if self.b1 is not None and self.b1.shape != (n, h):
            raise ValueError(f"b1 must have shape ({n}, {h}), got {tuple(self.b1.shape)}.")
        if self.b2 is not None and self.b2.shape != (n, self.w2.shape[2]):
            raise ValueError(f"b2 must have shape ({n}, {self.w2.shape[2]}), got {tuple(self.b2.shape)}.")


def choose_strategy(rows: int, length: int, width: int, assignments: int, mlp: ExpertMLPWeights) -> str:
    """'dense', 'per_row' or 'grouped': the cheapest in multiply-adds plus the cost of moving values.

    rows R of length T, `width` slots per row of which `assignments` are filled. `per_row` moves each
    slot's weights twice (the gather, the gradient's index_add), `grouped` each assigned row twice (gather
    and combine, forward and backward alike)."""
    n, d, h = mlp.w1.shape
    o = mlp.w2.shape[2]
    macs_per_token = h * (d + o)
    dense = rows * length * n * macs_per_token + MOVE_COST_IN_MACS * n * d * h  # (one copy of W1)
    per_row = rows * width * (length * macs_per_token + 2 * MOVE_COST_IN_MACS * h * (d + o))
    grouped = assignments * length * (macs_per_token + 2 * MOVE_COST_IN_MACS * (d + o)) + GROUPED_OVERHEAD_IN_MACS
    return min((dense, "dense"), (per_row, "per_row"), (grouped, "grouped"))[1]


def expert_mlp(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    mlp: ExpertMLPWeights,
    act: Callable[[torch.Tensor], torch.Tensor],
    strategy: Optional[str] = None,
) -> torch.Tensor:
    """sum_j weights[:, j] * f_{experts[:, j]}(x) for rows x (R, ..., D); see the module docstring.

    `strategy` forces one of 'dense', 'per_row', 'grouped', 'single' (for tests and benchmarks; 'single' only
    where every row has the same one expert); None picks the cheapest."""
    mlp.check()
    num_experts, d, _ = mlp.w1.shape
    if x.shape[-1] != d:
        raise ValueError(f"The experts take {d} input features, but the rows have {x.shape[-1]}.")
    if experts.dim() != 2 or experts.shape[0] != x.shape[0] or weights.shape != experts.shape:
        raise ValueError(
            f"experts and weights must both have shape (rows, k) with rows = {x.shape[0]} (x's first dimension); "
            f"got experts {tuple(experts.shape)} and weights {tuple(weights.shape)}."
        )
    out_features = mlp.w2.shape[2]
    # no reshape of a 3-D x: its gradient would then be a view, which autograd cannot accumulate in place
    seq = x if x.dim() == 3 else x.reshape(x.shape[0], -1, d)  # (R, T, D)
    rows, length, width = seq.shape[0], seq.shape[1], experts.shape[1]
    empty, counts = count_assignments(experts, num_experts)
    assignments = rows * width - empty
    if assignments == 0 or length == 0:
        # zeros that still reach every parameter, so DDP sees no unused parameter when no row is routed
        anchor = sum(t.sum() for t in (mlp.w1, mlp.b1, mlp.w2, mlp.b2) if t is not None) * 0
        return x.new_zeros(*x.shape[:-1], out_features) + anchor.to(x.dtype)
    weights = weights.to(x.dtype)
    if empty:  # an empty slot's weight is exactly 0 and gets no gradient, whatever the router put there
        weights = weights.masked_fill(experts < 0, 0.0)
    only_expert = None  # the one expert every row names, if there is one
    if width == 1 and not empty and counts.count(0) == num_experts - 1:
        only_expert = next(e for e, c in enumerate(counts) if c)
    if strategy is None and only_expert is not None:
        strategy = "single"
    strategy = strategy or choose_strategy(rows, length, width, assignments, mlp)
    if strategy == "single":
        if only_expert is None:
            raise ValueError(
                "strategy='single' needs every row to have exactly one slot, all naming the same expert; "
                "leave strategy=None to pick one that fits this decision."
            )
        out = _single_expert_mlp(seq, only_expert, weights, mlp, act)
    elif strategy == "dense":
        out = _dense_mlp(seq, experts, weights, mlp, act)
    elif strategy == "per_row":
        out = _per_row_mlp(seq, experts, weights, mlp, act)
    elif strategy == "grouped":
        out = _grouped_mlp(seq, experts, weights, mlp, act, (empty, counts))
    else:
        raise ValueError(f"Unknown dispatch strategy {strategy!r}; use 'dense', 'per_row', 'grouped' or 'single'.")
    return out.reshape(*x.shape[:-1], out_features)


def _dense_weights(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(R, N): each row's combine weight for every expert (repeats add up; empty slots already weigh 0)."""
    return weights.new_zeros(experts.shape[0], num_experts).scatter_add(1, experts.clamp(min=0), weights)


def _weighted_output_bias(b2: Optional[torch.Tensor], experts: torch.Tensor, weights: torch.Tensor):
    """sum_j w_j b2[e_j] per row: (R, O), or None without a bias."""
    return None if b2 is None else _dense_weights(experts, weights, b2.shape[0]) @ b2


def _single_expert_mlp(seq, expert: int, weights, mlp: ExpertMLPWeights, act):
    """One expert for every row: 3-D @ 2-D matmuls fold into single GEMMs over all R*T tokens."""
    hidden = torch.matmul(seq, mlp.w1[expert])
    if mlp.b1 is not None:
        hidden.add_(mlp.b1[expert])
    hidden = act(hidden) * weights.view(-1, 1, 1)  # weights (R, 1): the row's combine weight
    out = torch.matmul(hidden, mlp.w2[expert])
    if mlp.b2 is not None:
        out.add_(weights.view(-1, 1, 1) * mlp.b2[expert])  # in place: the matmul's backward does not need out
    return out


def _dense_mlp(seq, experts, weights, mlp: ExpertMLPWeights, act):
    """All N experts as one MLP of hidden size N*H; rows weight the hidden units of each expert."""
    rows, length, d = seq.shape
    n, _, h = mlp.w1.shape
    dense_w = _dense_weights(experts, weights, n)
    w1_all = mlp.w1.permute(1, 0, 2).reshape(d, n * h)
    flat = seq.reshape(rows * length, d)
    if mlp.b1 is not None:
        hidden = torch.addmm(mlp.b1.reshape(n * h), flat, w1_all)
    else:
        hidden = flat @ w1_all
    hidden = act(hidden).view(rows, length, n, h) * dense_w.view(rows, 1, n, 1)
    # 3-D @ 2-D: matmul folds it into one GEMM and returns a tensor (not a view) that add_ may modify
    out = torch.matmul(hidden.view(rows, length, n * h), mlp.w2.reshape(n * h, -1))
    if mlp.b2 is not None:
        out.add_((dense_w @ mlp.b2).unsqueeze(1))  # in place: the matmul's backward does not need its output
    return out


def _per_row_mlp(seq, experts, weights, mlp: ExpertMLPWeights, act):
    """Each row runs with its own gathered weights: one batched GEMM per slot down, one of width k*H up."""
    rows, length, d = seq.shape
    h = mlp.w1.shape[2]
    width = experts.shape[1]
    safe = experts.clamp(min=0)
    parts = []
    for j in range(width):
        e = safe[:, j]
        w1 = mlp.w1.index_select(0, e)  # (R, D, H)
        if mlp.b1 is None:
            parts.append(torch.bmm(seq, w1))
        else:
            parts.append(torch.baddbmm(mlp.b1.index_select(0, e).unsqueeze(1), seq, w1))
    hidden = parts[0] if width == 1 else torch.cat(parts, dim=-1)  # (R, T, k*H)
    scale = weights.repeat_interleave(h, dim=1) if width > 1 else weights
    hidden = act(hidden) * scale.unsqueeze(1)
    w2 = mlp.w2.index_select(0, safe.reshape(-1)).view(rows, width * h, -1)  # (R, k*H, O)
    bias = _weighted_output_bias(mlp.b2, experts, weights)
    return torch.bmm(hidden, w2) if bias is None else torch.baddbmm(bias.unsqueeze(1), hidden, w2)


def _grouped_mlp(seq, experts, weights, mlp: ExpertMLPWeights, act, counted):
    """Rows sorted by expert, each expert once on its contiguous group (grouped GEMM)."""
    rows, length, d = seq.shape
    g = group_by_expert(experts, weights, mlp.w1.shape[0], counted)
    n_assign = g.rows.shape[0]
    token_counts = [c * length for c in g.counts]
    token_offsets = group_offsets(token_counts, seq.device)
    grouped = gather_rows(seq, g).reshape(n_assign * length, d)
    hidden = grouped_linear(grouped, mlp.w1, token_offsets, token_counts, mlp.b1)
    token_weights = g.weights.repeat_interleave(length) if length > 1 else g.weights
    hidden = act(hidden) * token_weights.unsqueeze(1)
    out = grouped_linear(hidden, mlp.w2, token_offsets, token_counts, mlp.b2, token_weights)
    return combine_rows(out.view(n_assign, length, -1), g, rows)


# ----- any expert -----------------------------------------------------------------------------------


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
    counted = count_assignments(experts, num_experts)
    if counted[0] == experts.numel():
        # zeros that still reach the experts' parameters (an expert run on no rows), as in expert_mlp
        anchor = expert_forward(0, x[:0]).sum() * 0
        return x.new_zeros(*x.shape[:-1], out_features) + anchor.to(x.dtype)
    g = group_by_expert(experts, weights, num_experts, counted)
    grouped = gather_rows(x, g)
    outputs = [expert_forward(e, chunk) for e, chunk in enumerate(grouped.split(g.counts)) if g.counts[e] > 0]
    y = torch.cat(outputs) * g.weights.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return combine_rows(y, g, x.shape[0])


# ----- banks ----------------------------------------------------------------------------------------


class ExpertBank(nn.Module):
    """Base class: `num_experts`, `in_features`, `out_features` and forward(x, experts, weights)."""

    num_experts: int
    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MLPExpertBank(ExpertBank):
    """A bank of two-matmul experts: subclasses set `act` (or override `hidden_activation`) and implement
    `mlp_weights()`; the dispatch is `expert_mlp`'s."""

    act: Callable[[torch.Tensor], torch.Tensor]

    def mlp_weights(self) -> ExpertMLPWeights:
        raise NotImplementedError

    def hidden_activation(self, h: torch.Tensor) -> torch.Tensor:
        """What runs between the two matmuls (elementwise, so it commutes with the combine weights)."""
        return self.act(h)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x, experts, weights, self.mlp_weights(), self.hidden_activation)


class AdapterBank(MLPExpertBank):
    """N bottleneck adapters (Houlsby et al. 2019): up(act(down(x))). The up projection starts at zero, so an
    untrained bank adds nothing to the model."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        adapter_dim: int,
        out_features: int | None = None,
        activation: str = "relu",
        init_weights: bool = True,
    ):
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.out_features = out_features or in_features
        self.adapter_dim = adapter_dim
        self.activation = activation
        self.act = activation_fn(activation)
        self.down_weight = nn.Parameter(torch.empty(num_experts, in_features, adapter_dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, adapter_dim))
        self.up_weight = nn.Parameter(torch.empty(num_experts, adapter_dim, self.out_features))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, self.out_features))
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        # the same scale as nn.Linear's default init, per expert
        bound = 1.0 / self.in_features**0.5
        nn.init.uniform_(self.down_weight, -bound, bound)
        nn.init.zeros_(self.down_bias)
        if init_weights:
            nn.init.zeros_(self.up_weight)
        else:
            up_bound = 1.0 / self.adapter_dim**0.5
            nn.init.uniform_(self.up_weight, -up_bound, up_bound)
        nn.init.zeros_(self.up_bias)

    def mlp_weights(self) -> ExpertMLPWeights:
        return ExpertMLPWeights(self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, adapter_dim={self.adapter_dim}, "
            f"out_features={self.out_features}, activation={self.activation!r}"
        )


class EmbeddingBank(ExpertBank):
    """Experts that output a learned vector whatever their input (the DAE-Syn decoder's subnetworks)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int = 0):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.embeddings = nn.Parameter(torch.randn(num_experts, out_features))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        valid = (experts >= 0).unsqueeze(-1)
        vectors = self.embeddings[experts.clamp(min=0)] * valid  # (R, k, D)
        out = (weights.unsqueeze(-1).to(vectors.dtype) * vectors).sum(dim=1)
        return out.view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features).expand(*x.shape[:-1], -1)
