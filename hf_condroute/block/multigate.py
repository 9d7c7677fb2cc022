"""Several gates over one bank (multi-gate MoE, Ma et al. 2018; paper B's multi-task models, its supplement S6):
each named gate routes the same rows over the shared experts and gets its own output, and an expert chosen by
several gates for the same row runs once for that row.

    block = MultiGateBlock({"digit_a": router_a, "digit_b": router_b}, bank)
    outputs = block(x, RoutingInputs(step=step))      # {"digit_a": (B, ..., O), "digit_b": (B, ..., O)}

Every router works as a gate. Its decisions, statistics and auxiliary losses are recorded under the block's name
with the gate's in brackets (`"moe[digit_a]"`; in a PEFT layer `(adapter, "name[gate]")`). Gates that merge
parameters (`smear`) each run their own merged expert: a merged expert belongs to one gate's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import ExpertBank
from ..routers import Router
from .routed_block import RoutedBlock, RoutedRows, RoutingInputs, check_router_fits


def gate_key(record_key, gate: str):
    """The record key of one gate of a block: `name[gate]` (the adapter name of a PEFT layer kept)."""
    if isinstance(record_key, tuple):
        owner, name = record_key
        return owner, f"{name}[{gate}]"
    return f"{record_key}[{gate}]"


class MultiGateBlock(RoutedBlock):
    """Named routers (`self.router`, a ModuleDict, so their parameters keep the `.router.` of every router) over one
    expert bank; forward returns {gate: output}."""

    def __init__(self, routers: dict[str, Router], experts: ExpertBank, granularity: str = "example", name: str = ""):
        if not routers:
            raise ValueError("MultiGateBlock needs at least one gate: pass {gate name: router}.")
        for gate, router in routers.items():
            if not isinstance(gate, str) or not gate or "[" in gate or "]" in gate:
                raise ValueError(f"Gate names must be non-empty strings without brackets, got {gate!r}.")
            check_router_fits(router, experts, f"{name}[{gate}]")
        nn.Module.__init__(self)
        self.router = nn.ModuleDict(routers)
        self.experts = experts
        self.granularity = granularity
        self.name = name
        self.record_key = name

    def forward(self, x: torch.Tensor, inputs: RoutingInputs | None = None) -> dict[str, torch.Tensor]:
        inputs = inputs or RoutingInputs()
        r = self.routed_rows(x, inputs)
        outputs: dict[str, torch.Tensor] = {}
        shared = {}  # gate -> (bank experts, weights) of the gates whose outputs mix experts
        for gate, router in self.router.items():
            decision, weights = self.decide(router, gate_key(self.record_key, gate), r, inputs)
            if router.merges_experts:
                outputs[gate] = self.run_experts(router, r, decision, weights)
            else:
                shared[gate] = (router.bank_experts(decision.experts), weights)
        if shared:
            outputs.update(self._run_shared(r, shared))
        return {gate: self.scatter(outputs[gate], r, x) for gate in self.router}

    def _run_shared(self, r: RoutedRows, decisions: dict) -> dict[str, torch.Tensor]:
        """Each (row, expert) that any gate chose runs once, unweighted; each gate then sums its own weights' share."""
        gates = list(decisions)
        experts = torch.cat([decisions[g][0] for g in gates], dim=1)  # (R, S): every gate's slots side by side
        dtype = r.rows.dtype
        # per slot, the weight each gate gives it (R, S, G): a gate weighs only its own slots
        onehot = torch.eye(len(gates), dtype=dtype, device=experts.device)
        slot_weights = torch.cat(
            [
                decisions[g][1].to(dtype).masked_fill(decisions[g][0] < 0, 0.0).unsqueeze(-1) * onehot[i]
                for i, g in enumerate(gates)
            ],
            dim=1,
        )
        # a slot repeating an expert already in its row hands its weights to the first slot with that expert
        same = experts.unsqueeze(2) == experts.unsqueeze(1)  # (R, S, S)
        first = same.int().argmax(dim=2)  # (R, S) the first slot of each slot's expert
        slot_weights = torch.zeros_like(slot_weights).scatter_add(
            1, first.unsqueeze(-1).expand_as(slot_weights), slot_weights
        )
        keep = (first == torch.arange(experts.shape[1], device=experts.device)) & (experts >= 0)
        row_of, slot_of = keep.nonzero(as_tuple=True)  # one assignment per distinct (row, expert)
        runs = self.experts(
            r.rows.index_select(0, row_of),
            experts[row_of, slot_of].unsqueeze(1),
            torch.ones(row_of.shape[0], 1, dtype=dtype, device=experts.device),
        )  # (A, T, O): each distinct assignment's unweighted output
        out_shape = (r.rows.shape[0], *runs.shape[1:])
        result = {}
        for i, g in enumerate(gates):
            w = slot_weights[row_of, slot_of, i].view(-1, *([1] * (runs.dim() - 1)))
            result[g] = runs.new_zeros(out_shape).index_add(0, row_of, runs * w)
        return result
