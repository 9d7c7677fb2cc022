"""An adapter bank with non-zero biases, its plain per-row reference, random decisions and the comparison of
outputs and gradients, for the dispatch tests."""

from __future__ import annotations

import torch

from hf_condroute import AdapterBank

D, H, N = 16, 8, 6


def make_bank(dtype=torch.float64, n=N, seed=0) -> AdapterBank:
    torch.manual_seed(seed)
    bank = AdapterBank(n, D, H, init_weights=False).to(dtype)
    with torch.no_grad():  # non-zero biases, so that their gradients and weighting are checked too
        bank.down_bias.normal_()
        bank.up_bias.normal_()
    return bank


def reference(bank: AdapterBank, x, experts, weights):
    """sum_j w_j f_{e_j}(x) row by row; empty slots (-1) add nothing."""
    rows = []
    for r in range(x.shape[0]):
        acc = torch.zeros(*x.shape[1:-1], bank.out_features, dtype=x.dtype)
        for j in range(experts.shape[1]):
            e = int(experts[r, j])
            if e >= 0:
                hidden = bank.act(x[r] @ bank.down_weight[e] + bank.down_bias[e])
                acc = acc + weights[r, j] * (hidden @ bank.up_weight[e] + bank.up_bias[e])
        rows.append(acc)
    return torch.stack(rows)


def decision(rows: int, k: int, seed: int, used=range(N), empty_slots: bool = True):
    """Random distinct experts per row from `used` (so other experts get no rows), some slots empty."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(list(used))
    experts = torch.stack([used[torch.randperm(len(used), generator=g)[:k]] for _ in range(rows)])
    if empty_slots:
        experts[1, 0] = -1
        if k > 1:
            experts[3, k - 1] = -1
    weights = torch.rand(rows, k, generator=g, dtype=torch.float64)
    return experts, weights


def grads_of(fn, bank, x, weights, grad_out):
    out = fn()
    inputs = [x, weights, *bank.parameters()]
    return out, torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def assert_same(fast, ref, rtol, atol):
    (out, grads), (ref_out, ref_grads) = fast, ref
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=rtol, atol=atol)
