"""Expert capacity of token-choice routers (`expert_capacity_factor`): assignments over capacity pass through
unchanged, first choices first, in token order; the dropped fraction reaches the statistics; off by default."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_condroute
from hf_condroute import RoutedAdapterConfig
from hf_condroute.block.routed_block import RoutedBlock, RoutingInputs
from hf_condroute.block.step import RoutingStep
from hf_condroute.experts import AdapterBank
from hf_condroute.routers import build_router
from hf_condroute.routers.base import RoutingDecision
from hf_condroute.routers.capacity import expert_capacity, limit_capacity
from hf_condroute.routers.config import RoutingConfig
from hf_condroute.stats import RoutingStatsAccumulator

D = 6


def test_capacity_keeps_first_choices_first_in_token_order():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.rand(4, 2)
    assert expert_capacity(0.4, rows=4, k=2, num_experts=3) == 2  # ceil(0.4 * 8 / 3)
    d = limit_capacity(RoutingDecision(experts, weights, torch.rand(4, 3)), 3, 0.4)
    # first choices: expert 0 takes rows 0, 1 (row 2 is over), expert 1 row 3; then second choices: expert 1 takes
    # row 0 (its 2nd), expert 2 row 1; row 2's expert 1 and row 3's expert 0 are over capacity
    assert d.experts.tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1]]
    assert d.dropped.tolist() == [[-1, -1], [-1, -1], [0, 1], [-1, 0]]
    assert torch.equal(d.weights, weights.masked_fill(d.experts < 0, 0.0))
    assert torch.equal(d.requested_experts(), experts)


def block(factor, granularity="example", top_k=1, seed=0):
    torch.manual_seed(seed)
    config = RoutingConfig(
        router="top_k",
        num_experts=2,
        top_k=top_k,
        router_batchnorm=False,
        expert_capacity_factor=factor,
        router_aux_loss_coef=0.1,
    )
    bank = AdapterBank(2, D, 4, init_weights=False)
    return RoutedBlock(build_router(config, D, "b"), bank, granularity, name="b")


def test_rows_over_capacity_get_nothing_and_the_rest_are_unchanged():
    x = torch.randn(5, 3, D)
    limited, free = block(0.1), block(None)  # capacity ceil(0.1 * 5 / 2) = 1 per expert
    step = RoutingStep()
    out = limited(x, RoutingInputs(step=step))
    reference = free(x)
    chosen = free.router(x.mean(dim=1)).experts[:, 0]
    first = {int(e): int((chosen == e).nonzero()[0]) for e in chosen.unique()}  # each expert's first example
    kept = torch.tensor([i in first.values() for i in range(5)])
    decision = hf_condroute.block.step.RoutingRecord.user_decision(step.records["b"])
    assert decision.experts[:, 0].tolist() == [int(chosen[i]) if kept[i] else -1 for i in range(5)]
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))  # the base output passes through unchanged
    # the kept rows go through the same expert, but in a GEMM of another row count (1 row here, all of the expert's
    # rows there), which a CPU's kernels may sum in another order: equal up to a few fp32 ulps (the experts are exact)
    torch.testing.assert_close(out[kept], reference[kept], rtol=1e-6, atol=1e-6)


def test_per_token_capacity_counts_real_tokens_in_order():
    x = torch.randn(2, 4, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 real tokens, k=2: capacity ceil(0.3 * 14 / 2) = 3
    step = RoutingStep()
    limited = block(0.3, granularity="token", top_k=2)
    limited(x, RoutingInputs(mask=mask, step=step))
    d = step.records["b"].decision
    requested = d.requested_experts()
    order = requested.t().reshape(-1)  # first choices of tokens in order, then second choices
    seen = {0: 0, 1: 0}
    expected = []
    for e in order.tolist():
        seen[e] += 1
        expected.append(e if seen[e] <= 3 else -1)
    assert d.experts.t().reshape(-1).tolist() == expected
    assert int((d.dropped >= 0).sum()) == 14 - 6


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x)


def routed(factor, seed=0):
    torch.manual_seed(seed)
    config = RoutedAdapterConfig(
        target_modules=["proj"],
        num_experts=2,
        adapter_dim=4,
        init_weights=False,
        router_batchnorm=False,
        expert_capacity_factor=factor,
        router_aux_loss_coef=0.1,
    )
    return get_peft_model(OneLayer(), config)


def test_in_a_tuner_dropped_examples_get_the_base_output_and_statistics_report_the_fraction():
    x = torch.randn(6, 3, D)
    model = routed(0.1)  # capacity 1 per expert: at most 2 of the 6 examples are routed
    out = model(x=x)
    routing = hf_condroute.get_routing(model)
    with model.disable_adapter():
        base = model(x=x)
    d = routing["proj"]
    kept = d.experts[:, 0] >= 0
    assert 1 <= int(kept.sum()) <= 2 and bool((d.dropped[:, 0] >= 0).eq(~kept).all())
    assert len(set(d.experts[kept, 0].tolist())) == int(kept.sum())  # one example per expert
    torch.testing.assert_close(out[~kept], base[~kept], rtol=0, atol=0)
    assert not torch.allclose(out[kept], base[kept])
    acc = RoutingStatsAccumulator()
    acc.update(routing)
    stats = acc.compute("eval")
    dropped = 6 - int(kept.sum())
    assert stats.blocks["proj"].dropped == dropped and stats.blocks["proj"].rows == 6
    assert stats.summary()["dropped_fraction"] == pytest.approx(dropped / 6)
    assert stats.to_dict()["blocks"]["proj"]["dropped_fraction"] == pytest.approx(dropped / 6)


def test_auxiliary_losses_see_what_the_router_asked_for():
    x = torch.randn(6, 3, D)
    values = {}
    for factor in (0.1, None):
        model = routed(factor).train()
        model(x=x)
        values[factor] = hf_condroute.get_routing_losses(model)["load_balance"]
    torch.testing.assert_close(values[0.1], values[None])


def test_off_by_default_and_a_large_capacity_change_nothing():
    assert RoutedAdapterConfig().expert_capacity_factor is None
    x = torch.randn(6, 3, D)
    free, roomy = routed(None), routed(float(6))  # capacity 18 >= every assignment
    torch.testing.assert_close(free(x=x), roomy(x=x), rtol=0, atol=0)
    assert hf_condroute.get_routing(free)["proj"].dropped is None
    acc = RoutingStatsAccumulator()
    acc.update(hf_condroute.get_routing(free))
    stats = acc.compute("eval")
    assert "dropped_fraction" not in stats.summary() and "dropped" not in stats.to_dict()["blocks"]["proj"]
    acc = RoutingStatsAccumulator()
    acc.update(hf_condroute.get_routing(roomy))
    assert acc.compute("eval").summary()["dropped_fraction"] == 0.0


@pytest.mark.parametrize(
    "router, message", [("expert_choice", "expert_choice_capacity_factor"), ("tag", "routes by design")]
)
def test_capacity_is_refused_where_it_does_not_apply(router, message):
    with pytest.raises(ValueError, match=message):
        RoutedAdapterConfig(router=router, expert_capacity_factor=1.0)


def test_the_callback_logs_the_dropped_fraction():
    from transformers import TrainerState

    from hf_condroute import RoutingStatsCallback

    model = routed(0.1)
    model(x=torch.randn(6, 3, D))
    acc = RoutingStatsAccumulator()
    acc.update(hf_condroute.get_routing(model))
    stats = acc.compute("train")
    logs = RoutingStatsCallback()._report(stats, TrainerState(), "")
    assert logs["routing_dropped_fraction"] == pytest.approx(stats.blocks["proj"].dropped / 6)
