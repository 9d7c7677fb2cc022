"""The LoRA bank's per-token path (`per_token_lora`) against a naive per-row, per-slot reference: forward and every
gradient, its three layouts (fewer slots than experts: the chosen ones gathered; fewer rows than the rank; as many or
more), empty slots, an expert named
twice in a row, and the generic dispatch it replaces."""

from __future__ import annotations

import pytest
import torch

from hf_condroute import LoraBank
from hf_condroute.experts.lora import per_token_lora


def naive(x, experts, weights, a, b):
    rows = x.reshape(experts.shape[0], -1)
    out = rows.new_zeros(rows.shape[0], b.shape[-1])
    for i in range(rows.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[i, j])
            if e >= 0:
                out[i] = out[i] + weights[i, j] * (rows[i] @ a[e] @ b[e])
    return out.view(*x.shape[:-1], -1)


def case(rows: int, d: int = 16, o: int = 12, n: int = 5, r: int = 4, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, n, (rows, k), generator=g)
    experts[0, 1] = -1  # an empty slot
    experts[1, 1] = experts[1, 0]  # an expert named twice
    weights = torch.rand(rows, k, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, d, r, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, o, generator=g, dtype=torch.float64, requires_grad=True)
    return x, experts, weights, a, b


@pytest.mark.parametrize("rows", [2, 3, 16], ids=["slots<N", "rows<r", "rows>=r"])
def test_per_token_lora_matches_a_naive_reference_with_gradients(rows):
    x, experts, weights, a, b = case(rows)
    out = per_token_lora(x, experts, weights, a, b)
    ref = naive(x, experts, weights, a, b)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (x, weights, a, b))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (x, weights, a, b))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert grads[1][0, 1] == 0  # the empty slot's weight gets no gradient


@pytest.mark.parametrize("strategy", ["dense", "per_row", "grouped"])
def test_the_bank_takes_the_per_token_path_and_agrees_with_the_generic_dispatch(strategy):
    from hf_condroute.experts import expert_mlp

    bank = LoraBank(5, 16, 12, r=3, lora_alpha=6, init_lora_weights=False).double()
    x, experts, weights, _, _ = case(7)
    assert bank.takes_per_token_path(x, experts)
    assert not bank.takes_per_token_path(torch.randn(7, 4, 16), experts)  # rows of several tokens: per example
    out = bank(x, experts, weights)
    generic = expert_mlp(x, experts, weights * bank.scaling, bank.mlp_weights(), bank.act, strategy=strategy)
    torch.testing.assert_close(out, generic)
    params = (x, weights, bank.lora_A, bank.lora_B)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_grads = torch.autograd.grad((generic * upstream).sum(), params)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
