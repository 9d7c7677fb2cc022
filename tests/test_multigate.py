"""Several gates over one bank: each gate's output equals its own single-gate block's, an expert chosen by several
gates for a row runs once for it, records keep the gate's name, and every router works as a gate."""

from __future__ import annotations

import pytest
import torch

import hf_condroute
from hf_condroute import ROUTERS, AdapterBank, RoutedBlock, RoutingConfig, RoutingInputs, RoutingStep, build_router
from hf_condroute.block.multigate import MultiGateBlock

from .conftest import top_k_for

D, H, N = 8, 4, 4


def gates_and_bank(names=("a", "b"), router="top_k", granularity="example", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RoutingConfig(
        router=router,
        num_experts=N,
        top_k=top_k_for(router) if router != "top_k" else 2,
        routing_granularity=granularity,
        **kw,
    )
    cfg.validate_routing()
    routers = {g: build_router(cfg, D, f"moe[{g}]") for g in names}
    bank = AdapterBank(next(iter(routers.values())).num_experts, D, H, init_weights=False).double()  # monolithic: 1
    with torch.no_grad():
        bank.up_bias.normal_()
    return routers, bank


class CountingBank(AdapterBank):
    """Counts how many (row, expert) assignments it computes."""

    def forward(self, x, experts, weights, merge=False):
        self.assignments = getattr(self, "assignments", 0) + int((experts >= 0).sum())
        return super().forward(x, experts, weights, merge=merge)


def test_each_gate_equals_its_own_block_and_shared_experts_run_once():
    routers, bank = gates_and_bank()
    counting = CountingBank(N, D, H, init_weights=False).double()
    counting.load_state_dict(bank.state_dict())
    block = MultiGateBlock(routers, counting, name="moe").double().eval()
    x = torch.randn(6, 5, D, dtype=torch.float64, requires_grad=True)
    step = RoutingStep()
    with torch.no_grad():
        for r in routers.values():  # routers whose choices overlap: copy a's network into b, then perturb b
            r.network.norm.running_var.fill_(1.0)
        routers["b"].network.proj.weight.copy_(routers["a"].network.proj.weight)
        routers["b"].network.proj.weight[:, :2] += 0.5
    outs = block(x, RoutingInputs(step=step))
    assert set(outs) == {"a", "b"}
    for gate, router in routers.items():
        single = RoutedBlock(router, bank, name="moe").double().eval()
        torch.testing.assert_close(outs[gate], single(x), rtol=1e-12, atol=1e-12)
    chosen = {g: step.records[f"moe[{g}]"].decision.experts for g in routers}
    distinct = sum(len(set(chosen["a"][r].tolist()) | set(chosen["b"][r].tolist())) for r in range(6))
    assert counting.assignments == distinct < 2 * 6 * 2  # overlaps ran once
    # gradients reach both gates' routers and the shared experts
    (outs["a"].sum() + outs["b"].pow(2).sum()).backward()
    assert x.grad is not None and bank.up_weight.grad is None and counting.up_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_works_as_a_gate(router):
    cls = hf_condroute.routers.router_class(router)
    granularity = "example" if cls.per_example_only else "token"
    routers, bank = gates_and_bank(router=router, granularity=granularity)
    block = MultiGateBlock(routers, bank, granularity=granularity, name="moe").double().train()
    x = torch.randn(4, 3, D, dtype=torch.float64, requires_grad=True)
    step = RoutingStep()
    torch.manual_seed(1)
    outs = block(x, RoutingInputs(tags=torch.tensor([0, 1, 2, 3]), token_ids=torch.arange(12).view(4, 3), step=step))
    assert {k for k in step.records} == {"moe[a]", "moe[b]"}
    # the same forward through single-gate blocks, with the same random draws
    torch.manual_seed(1)
    step2 = RoutingStep()
    singles = {}
    for g, r in routers.items():
        single = RoutedBlock(r, bank, granularity=granularity, name="moe").double().train()
        single.record_key = f"moe[{g}]"
        singles[g] = single(
            x, RoutingInputs(tags=torch.tensor([0, 1, 2, 3]), token_ids=torch.arange(12).view(4, 3), step=step2)
        )
    for g in routers:
        torch.testing.assert_close(outs[g], singles[g], rtol=1e-9, atol=1e-9)
    if cls.needs_reward:
        step.set_reward(torch.rand(4))
    loss = sum(o.sum() for o in outs.values()) + step.loss(x.device)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gate_names_are_checked():
    routers, bank = gates_and_bank()
    with pytest.raises(ValueError, match="at least one gate"):
        MultiGateBlock({}, bank)
    with pytest.raises(ValueError, match="without brackets"):
        MultiGateBlock({"a[0]": routers["a"]}, bank)
