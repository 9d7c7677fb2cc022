"""Rows grouped by expert: the sort, gather and combine that every grouped dispatch shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    inverse: torch.Tensor | None

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
    experts: torch.Tensor, weights: torch.Tensor, num_experts: int, counted: tuple[int, list[int]] | None = None
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
