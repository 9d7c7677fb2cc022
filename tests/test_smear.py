"""SMEAR: per example, the router's probabilities average the experts' parameters and the one merged expert runs;
its forward and gradients equal an explicitly merged module's, it is not the mixture of outputs, it refuses
per-token routing, and it trains in the tuners."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_condroute
import hf_condroute.experts.strategies as strategies_mod
from hf_condroute import AdapterBank, RoutedAdapterConfig, RoutedBlock, RoutedFFNConfig, RoutingConfig, build_router
from hf_condroute.experts import ExpertBank, dispatch

from .conftest import bert_batch, make_bert, make_t5, t5_batch

N, D, H = 4, 6, 3


def bank_and_probs(seed=0):
    torch.manual_seed(seed)
    bank = AdapterBank(N, D, H, init_weights=False, activation="gelu").double()
    with torch.no_grad():
        bank.up_bias.normal_()
        bank.down_bias.normal_()
    probs = torch.softmax(torch.randn(5, N, dtype=torch.float64), -1).requires_grad_()
    return bank, probs


def explicit_merged(bank: AdapterBank, x, probs):
    """One nn.Linear adapter per row, its weights set to sum_i p_i theta_i (autograd through the assignment)."""
    outs = []
    for r in range(x.shape[0]):
        down, up = nn.Linear(D, H).double(), nn.Linear(H, D).double()
        p = probs[r]
        w_down = torch.einsum("n,ndh->dh", p, bank.down_weight)
        w_up = torch.einsum("n,nho->ho", p, bank.up_weight)
        b_down, b_up = p @ bank.down_bias, p @ bank.up_bias
        y = torch.func.functional_call(down, {"weight": w_down.t(), "bias": b_down}, (x[r],))
        outs.append(torch.func.functional_call(up, {"weight": w_up.t(), "bias": b_up}, (bank.act(y),)))
    return torch.stack(outs)


@pytest.mark.parametrize("length", [1, 7])
def test_merged_forward_and_gradients_equal_an_explicitly_merged_module(length):
    bank, probs = bank_and_probs()
    x = torch.randn(5, length, D, dtype=torch.float64, requires_grad=True)
    experts = torch.arange(N).expand(5, -1)
    grad_out = torch.randn(5, length, D, dtype=torch.float64)
    inputs = [x, probs, *bank.parameters()]
    got = bank(x, experts, probs, merge=True)
    ref = explicit_merged(bank, x, probs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, inputs, grad_out)
    for g, r in zip(grads, torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # dL/d theta_i = sum_b p_i(x_b) G_b: every expert learns from every example
    up_grad = next(g for t, g in zip(inputs, grads) if t is bank.up_weight)
    assert (up_grad.abs().sum(dim=(1, 2)) > 0).all()
    # a nonlinear expert: the merged expert is not the mixture of the experts' outputs
    assert not torch.allclose(got, bank(x, experts, probs), atol=1e-6)


def test_smear_router_weights_and_expert_dropout():
    cfg = RoutingConfig(router="smear", num_experts=N, smear_expert_dropout=0.5)
    torch.manual_seed(0)
    router = build_router(cfg, D)
    x = torch.randn(64, D)
    router.eval()
    d = router(x)
    assert d.experts.shape == (64, N) and torch.equal(d.experts[0], torch.arange(N))
    torch.testing.assert_close(d.weights, d.probs)  # evaluation: the full probabilities, no dropout
    torch.testing.assert_close(d.probs, d.logits.softmax(-1))
    router.train()
    d = router(x)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(64))  # renormalised over the kept experts
    dropped = d.weights < 1e-8
    assert 0.3 < dropped.float().mean() < 0.7  # about half the experts of each row leave the merge
    kept = ~dropped
    ratio = d.weights[kept] / d.probs[kept]  # kept experts keep their relative probabilities
    row = torch.arange(64).unsqueeze(1).expand(-1, N)[kept]
    for r in range(4):
        assert torch.allclose(ratio[row == r], ratio[row == r][0].expand_as(ratio[row == r]), rtol=1e-4)


def test_per_token_routing_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="routes per example only.*routing_granularity='example'"):
        RoutedAdapterConfig(router="smear", routing_granularity="token")
    with pytest.raises(ValueError, match="routes per example only"):
        RoutedFFNConfig(router="smear", init_weights=False)  # the routed FFN routes per token by default
    RoutedFFNConfig(router="smear", routing_granularity="example", init_weights=False)


def test_a_bank_that_cannot_merge_is_refused():
    class AnyExperts(ExpertBank):
        num_experts, in_features, out_features = N, D, D

        def forward(self, x, experts, weights):
            return dispatch(x, experts, weights, N, D, lambda e, rows: rows)

    router = build_router(RoutingConfig(router="smear", num_experts=N), D)
    with pytest.raises(ValueError, match="cannot merge them"):
        RoutedBlock(router, AnyExperts(), name="blk")


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_smear_trains_in_the_adapter_tuner_with_one_merged_expert_per_row(family, monkeypatch):
    base, batch = (make_t5(), t5_batch()) if family == "t5" else (make_bert(), bert_batch())
    model = get_peft_model(base, RoutedAdapterConfig(num_experts=N, adapter_dim=4, router="smear", init_weights=False))
    calls = []
    merged = strategies_mod.STRATEGIES["merged"]
    monkeypatch.setitem(strategies_mod.STRATEGIES, "merged", lambda *a: calls.append(a[0].shape[0]) or merged(*a))
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert calls and all(rows == batch["input_ids"].shape[0] for rows in calls)  # one merged expert per example
    routers = [p for n, p in model.named_parameters() if ".router." in n and p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers if p.dim() == 2)
    decision = next(iter(hf_condroute.get_routing(model).values()))
    assert decision.experts.shape[-1] == N


def test_smear_in_the_routed_ffn_per_example():
    model = make_bert()
    peft_model = get_peft_model(
        model,
        RoutedFFNConfig(
            num_experts=2, router="smear", routing_granularity="example", init_weights=False, task_type="SEQ_CLS"
        ),
    )
    peft_model.train()
    peft_model(**bert_batch()).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "routed_ffn_block" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_merged_lora_experts_apply_their_scaling_once():
    from hf_condroute import LoraBank

    torch.manual_seed(0)
    bank = LoraBank(N, D, D, r=2, lora_alpha=6, init_lora_weights=False).double()
    probs = torch.softmax(torch.randn(5, N, dtype=torch.float64), -1)
    x = torch.randn(5, 3, D, dtype=torch.float64)
    got = bank(x, torch.arange(N).expand(5, -1), probs, merge=True)
    a = torch.einsum("rn,ndk->rdk", probs, bank.lora_A)
    b = torch.einsum("rn,nko->rko", probs, bank.lora_B)
    torch.testing.assert_close(got, torch.bmm(torch.bmm(x, a), b) * 3.0, rtol=1e-12, atol=1e-12)
