"""`router_detach_input`: a learned router reads a detached copy of its input, so its losses train the router and
never the layers below it (Res-Dom's question whether tag supervision hurts through that path)."""

from __future__ import annotations

import pytest
import torch

from hf_condroute import RoutingConfig, build_router
from hf_condroute.routers.validation import ConfigError

LEARNED = ("top_k", "st_gumbel", "reinforce", "moesart", "dselect_k", "smear")


@pytest.mark.parametrize("router", LEARNED)
@pytest.mark.parametrize("detach", [False, True])
def test_routing_gradient_reaches_the_input_only_when_not_detached(router, detach):
    top_k = 2 if router == "moesart" else 1
    config = RoutingConfig(router=router, num_experts=4, top_k=top_k, router_detach_input=detach)
    net = build_router(config, 6, "block").train()
    x = torch.randn(8, 6, requires_grad=True)
    decision = net(x)
    (decision.logits.square().sum() + decision.weights.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.network.parameters())
    if detach:
        assert x.grad is None
    else:
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_detached_and_plain_routers_decide_the_same():
    torch.manual_seed(0)
    plain = build_router(RoutingConfig(router="top_k", num_experts=4), 6, "b").eval()
    detached = build_router(RoutingConfig(router="top_k", num_experts=4, router_detach_input=True), 6, "b").eval()
    detached.load_state_dict(plain.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(plain(x).experts, detached(x).experts)


def test_router_detach_input_must_be_a_flag():
    with pytest.raises(ConfigError, match="router_detach_input"):
        RoutingConfig(router_detach_input="yes").validate_routing()
