"""Permutation local search: a relabelled model computes the same function; the search keeps swaps that lower the
loss; the map is saved with the adapter; the callback runs on its schedule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict

import hf_condroute
from hf_condroute import (
    ROUTERS,
    AdapterBank,
    LocalSearchCallback,
    RoutedAdapterConfig,
    RoutedBlock,
    RoutingConfig,
    RoutingInputs,
    build_router,
    local_search,
    relabel_experts,
)
from hf_condroute.routers import router_class

from .conftest import make_t5, t5_batch

D, N = 6, 4


def make_block(router: str, seed: int = 0, **kw) -> RoutedBlock:
    cls = router_class(router)
    top_k = max(2, cls.min_top_k) if cls.uses_top_k else 1
    cfg = RoutingConfig(router=router, num_experts=N, top_k=top_k, expert_permutation=True, **kw)
    cfg.validate_routing()
    torch.manual_seed(seed)
    r = build_router(cfg, D, "blk")
    bank = AdapterBank(r.num_experts, D, 3, init_weights=False)
    with torch.no_grad():
        bank.up_bias.normal_()
    return RoutedBlock(r, bank, name="blk").double().eval()


INPUTS = RoutingInputs(tags=torch.tensor([0, 1, 2, 3, 1, 0]), keys=torch.arange(6) * 7919)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_permuted_relabelled_model_computes_the_same_function(router):
    block = make_block(router)
    x = torch.randn(6, 5, D, dtype=torch.float64)
    with torch.no_grad():
        before = block(x, INPUTS)
        if block.router.num_experts > 1:
            # the map alone moves outputs to other experts: it is what the search changes
            block.router.expert_map.copy_(torch.tensor([1, 0, 3, 2]))
            assert not torch.allclose(block(x, INPUTS), before)
            block.router.expert_map.copy_(torch.arange(N))
        perm = torch.randperm(block.experts.num_experts, generator=torch.Generator().manual_seed(3))
        relabel_experts(block, perm)  # experts move in the bank, the router's outputs follow them
        assert torch.equal(block.router.expert_map, perm)
        torch.testing.assert_close(block(x, INPUTS), before, rtol=0, atol=1e-12)
        relabel_experts(block, block.router.expert_map.argsort())  # back to the identity map, same function
        assert torch.equal(block.router.expert_map, torch.arange(block.experts.num_experts))
        torch.testing.assert_close(block(x, INPUTS), before, rtol=0, atol=1e-12)


class Wrapped(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, INPUTS)


@pytest.mark.parametrize("router", ["tag", "top_k", "dselect_k", "comet"])
def test_local_search_keeps_the_swaps_that_lower_the_loss(router):
    model = Wrapped(make_block(router))
    x = torch.randn(6, 5, D, dtype=torch.float64)
    with torch.no_grad():
        model.block.router.expert_map.copy_(torch.tensor([2, 0, 1, 3]))  # the target: a map three swaps away
        target = model(x)
        model.block.router.expert_map.copy_(torch.arange(N))
    loss_fn = lambda m, batch: (m(batch["x"]) - batch["y"]).pow(2).mean()  # noqa: E731
    result = local_search(model.train(), [{"x": x, "y": target}], loss_fn=loss_fn, rounds=5)
    assert model.training  # put back in its mode
    assert result.initial_loss > 0 and result.final_loss == pytest.approx(0.0, abs=1e-20)
    assert all(name == "block" for name, *_ in result.accepted)
    losses = [loss for *_, loss in result.accepted]
    assert losses == sorted(losses, reverse=True)  # every kept swap lowered the loss
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), target)


def test_local_search_needs_an_expert_permutation():
    cfg = RoutingConfig(router="top_k", num_experts=N)
    block = RoutedBlock(build_router(cfg, D), AdapterBank(N, D, 3))
    with pytest.raises(ValueError, match="expert_permutation=True"):
        local_search(Wrapped(block), [{}], loss_fn=lambda m, b: torch.zeros(()))
    with pytest.raises(ValueError, match="at least one batch"):
        local_search(Wrapped(make_block("top_k")), [])


def test_the_searched_map_is_saved_with_the_adapter_and_searched_through_the_model_loss():
    model = get_peft_model(
        make_t5(),
        RoutedAdapterConfig(
            num_experts=N, adapter_dim=8, router="comet", top_k=2, expert_permutation=True, init_weights=False
        ),
    )
    state = get_peft_model_state_dict(model)
    maps = [k for k in state if k.endswith("expert_map")]
    assert maps and all(torch.equal(state[k], torch.arange(N)) for k in maps)
    result = local_search(model, [t5_batch()], max_swaps_per_block=2)  # model(**batch).loss
    assert result.evaluations == 1 + 2 * len(maps)
    assert result.final_loss <= result.initial_loss


def test_callback_searches_on_its_schedule():
    model = Wrapped(make_block("top_k"))
    x = torch.randn(6, 5, D, dtype=torch.float64)
    batch = {"x": x, "y": torch.zeros(6, 5, D, dtype=torch.float64)}
    cb = LocalSearchCallback(
        [batch],
        every_n_steps=2,
        until_step=4,
        loss_fn=lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean(),
        max_swaps_per_block=1,
    )
    for step in range(1, 8):
        cb.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
    assert [s for s, _ in cb.results] == [2, 4]
    assert isinstance(cb, hf_condroute.LocalSearchCallback)
