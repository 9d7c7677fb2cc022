"""The expert dispatch through RoutedBlock, for every router, against a plain per-row (or merged) reference."""

from __future__ import annotations

import pytest
import torch

import hf_condroute
from hf_condroute import ROUTERS, AdapterBank, RoutedBlock, RoutingConfig, RoutingInputs, build_router

from .dispatch_helpers import D, H, reference


def reference_merged(bank: AdapterBank, x, experts, weights):
    """SMEAR's merged expert, row by row: one adapter whose parameters are the weighted average."""
    rows = []
    for r in range(x.shape[0]):
        merged = [
            sum(weights[r, j] * t[int(experts[r, j])] for j in range(experts.shape[1]) if experts[r, j] >= 0)
            for t in (bank.down_weight, bank.down_bias, bank.up_weight, bank.up_bias)
        ]
        rows.append(bank.act(x[r] @ merged[0] + merged[1]) @ merged[2] + merged[3])
    return torch.stack(rows)


class ReferenceBank(AdapterBank):
    def forward(self, x, experts, weights, merge=False):
        return (reference_merged if merge else reference)(self, x, experts, weights)


def block_pair(router: str, granularity: str):
    top_k = 2 if router in ("moesart", "top_k", "expert_choice") else 1
    cfg = RoutingConfig(router=router, num_experts=4, top_k=top_k, routing_granularity=granularity)
    cfg.validate_routing()
    blocks = []
    for bank_cls in (AdapterBank, ReferenceBank):
        torch.manual_seed(0)
        r = build_router(cfg, D, "blk")
        bank = bank_cls(r.num_experts, D, H, init_weights=False).double()
        with torch.no_grad():
            bank.up_bias.normal_()
        blocks.append(RoutedBlock(r, bank, granularity, name="blk").double().train())
    blocks[1].load_state_dict(blocks[0].state_dict())
    return blocks


@pytest.mark.parametrize("granularity,padded", [("example", True), ("token", True), ("token", False)])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_routed_block_matches_reference_for_every_router(router, granularity, padded):
    if granularity == "token" and hf_condroute.routers.router_class(router).per_example_only:
        with pytest.raises(ValueError, match="routes per example only"):
            block_pair(router, granularity)
        return
    fast, slow = block_pair(router, granularity)
    x0 = torch.randn(6, 5, D, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.long)
    if padded:
        mask[0, 3:] = 0
        mask[4, 1:] = 0
    inputs = RoutingInputs(
        mask=mask if padded else None,
        tags=torch.tensor([0, 1, 2, 3, 1, 0]),
        keys=torch.arange(6) * 7919 if granularity == "example" else None,  # per token: the token ids
        token_ids=torch.arange(30).view(6, 5),
    )
    grad_out = torch.randn(6, 5, D, dtype=torch.float64)
    results = []
    for block in (fast, slow):
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)  # stochastic routers draw the same choices
        out = block(x, inputs)
        params = [p for p in block.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out)
    for g, rg in zip(grads, ref_grads):
        if rg is None:
            assert g is None or (g == 0).all()
        else:  # routing runs in float32, so gradients through the router carry float32 rounding
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    if padded and granularity == "token":
        assert (out[mask == 0] == 0).all()
