"""The expert dispatch: every strategy, against a plain per-row loop, forward and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

import hf_condroute.experts.kernels as kernels_mod
import hf_condroute.experts.strategies as strategies_mod
from hf_condroute.experts import (
    ExpertMLPWeights,
    MLPExpertBank,
    choose_strategy,
    dispatch,
    expert_mlp,
    group_by_expert,
    grouped_linear,
    grouped_mm_supported,
)

from .dispatch_helpers import D, H, N, assert_same, decision, grads_of, make_bank, reference

STRATEGIES = ["dense", "per_row", "grouped", None]  # "single": test_one_expert_for_every_row


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,k", list(itertools.product([1, 5], [1, 2, 3])))
def test_expert_mlp_matches_reference(strategy, dtype, length, k):
    bank = make_bank(dtype)
    experts, weights = decision(7, k, seed=10 * length + k, used=[0, 2, 3, 5])  # experts 1 and 4 get no rows
    weights = weights.to(dtype).requires_grad_()
    x = torch.randn(7, length, D, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(7, length, D, dtype=dtype)
    fast = grads_of(
        lambda: expert_mlp(x, experts, weights, bank.mlp_weights(), bank.act, strategy), bank, x, weights, grad_out
    )
    ref = grads_of(lambda: reference(bank, x, experts, weights), bank, x, weights, grad_out)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_same(fast, ref, **tol)
    # experts without rows get exactly zero gradient; empty slots' weights too
    assert bank.down_weight.grad is None
    grad_w = fast[1][1]
    assert (grad_w[experts < 0] == 0).all()
    for param_grad in fast[1][2:]:
        assert (param_grad[[1, 4]] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("length", [1, 5])
def test_experts_without_biases(strategy, length):
    # T5's and Llama's FFNs have no biases: every strategy must run without them, forward and backward
    # (float32, so that the grouped strategy takes grouped_mm where this torch has it)
    bank = make_bank(torch.float32)
    with torch.no_grad():
        bank.down_bias.zero_()
        bank.up_bias.zero_()
    mlp = ExpertMLPWeights(bank.down_weight, None, bank.up_weight, None)
    experts, weights = decision(7, 2, seed=3)
    weights = weights.float().requires_grad_()
    x = torch.randn(7, length, D, requires_grad=True)
    grad_out = torch.randn(7, length, D)
    inputs = [x, weights, bank.down_weight, bank.up_weight]
    out = expert_mlp(x, experts, weights, mlp, bank.act, strategy)
    ref = reference(bank, x, experts, weights)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for g, rg in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g, rg, **tol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repeated_expert_in_a_row_adds_up(strategy):
    # MOESART with replacement may draw an expert twice; the outputs of both slots add up
    bank = make_bank()
    experts = torch.tensor([[2, 2], [0, 1], [3, 3]])
    weights = torch.rand(3, 2, dtype=torch.float64)
    x = torch.randn(3, 4, D, dtype=torch.float64)
    out = expert_mlp(x, experts, weights, bank.mlp_weights(), bank.act, strategy)
    torch.testing.assert_close(out, reference(bank, x, experts, weights))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_of_a_plain_sum(strategy):
    # out.sum() hands back a broadcast (stride 0) gradient, which grouped_mm's own backward refuses
    bank = make_bank(torch.float32)
    experts, weights = decision(6, 2, seed=1)
    x = torch.randn(6, 1, D, requires_grad=True)
    expert_mlp(x, experts, weights.float(), bank.mlp_weights(), bank.act, strategy).sum().backward()
    ref_x = x.detach().double().requires_grad_()
    reference(bank.double(), ref_x, experts, weights).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad.float(), rtol=1e-4, atol=1e-5)


def test_no_filled_slot_gives_zeros_of_the_right_shape():
    bank = make_bank()
    x = torch.randn(3, 2, D, dtype=torch.float64)
    out = expert_mlp(x, torch.full((3, 2), -1), torch.zeros(3, 2), bank.mlp_weights(), bank.act)
    assert out.shape == (3, 2, D) and (out == 0).all()
    out.sum().backward()  # every parameter still gets a (zero) gradient: DDP sees no unused parameter
    assert all(p.grad is not None and (p.grad == 0).all() for p in bank.parameters())
    out = expert_mlp(x[:0], torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), bank.mlp_weights(), bank.act)
    assert out.shape == (0, 2, D)


def test_two_dimensional_rows():
    bank = make_bank()
    experts, weights = decision(5, 2, seed=4)
    x = torch.randn(5, D, dtype=torch.float64)
    out = bank(x, experts, weights)
    torch.testing.assert_close(out, reference(bank, x.unsqueeze(1), experts, weights).squeeze(1))


def test_the_cost_model_picks_the_cheap_strategy():
    # T5-small-sized adapters (d 512, bottleneck 64), 8 experts; shapes are all the cost model reads
    mlp = ExpertMLPWeights(torch.empty(8, 512, 64, device="meta"), None, torch.empty(8, 64, 512, device="meta"), None)
    assert choose_strategy(rows=32, length=128, width=1, assignments=32, mlp=mlp) == "per_row"  # per example
    assert choose_strategy(rows=4096, length=1, width=1, assignments=4096, mlp=mlp) == "grouped"  # per token
    assert choose_strategy(rows=32, length=128, width=8, assignments=256, mlp=mlp) == "dense"  # softmax
    assert choose_strategy(rows=4096, length=1, width=8, assignments=4096 * 8, mlp=mlp) == "dense"
    assert choose_strategy(rows=4, length=32, width=1, assignments=4, mlp=mlp) == "per_row"  # too small to sort


def test_bad_decisions_are_refused_with_the_fix():
    bank = make_bank()
    x = torch.randn(3, 2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="names expert 7.*same num_experts"):
        bank(x, torch.tensor([[0], [7], [1]]), torch.ones(3, 1))
    with pytest.raises(ValueError, match="rows = 3"):
        bank(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    with pytest.raises(ValueError, match="take 16 input features"):
        bank(torch.randn(3, 2, 5), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="w2 must have shape"):
        expert_mlp(
            x,
            torch.zeros(3, 1, dtype=torch.long),
            torch.ones(3, 1),
            ExpertMLPWeights(bank.down_weight, None, bank.up_weight.transpose(1, 2), None),
            bank.act,
        )
    with pytest.raises(ValueError, match="Unknown dispatch strategy"):
        expert_mlp(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), bank.mlp_weights(), bank.act, "fast")


def test_grouping_sorts_by_expert_and_spots_permutations():
    experts = torch.tensor([[2], [0], [2], [1]])
    g = group_by_expert(experts, torch.tensor([[0.1], [0.2], [0.3], [0.4]]), 4)
    assert g.rows.tolist() == [1, 3, 0, 2] and g.counts == [1, 1, 2, 0]
    assert g.offsets.tolist() == [1, 2, 4, 4] and g.experts.tolist() == [0, 1, 2, 2]
    torch.testing.assert_close(g.weights, torch.tensor([0.2, 0.4, 0.1, 0.3]))
    assert g.inverse is not None and g.rows[g.inverse].tolist() == [0, 1, 2, 3]
    two = group_by_expert(torch.tensor([[1, -1], [0, 1]]), torch.ones(2, 2), 2)
    assert two.inverse is None and two.rows.tolist() == [1, 0, 1] and two.counts == [1, 2]


def test_grouped_linear_fallback_matches_grouped_mm(monkeypatch):
    torch.manual_seed(0)
    a = torch.randn(12, D, requires_grad=True)
    b = torch.randn(3, D, H, requires_grad=True)
    bias = torch.randn(3, H, requires_grad=True)
    scale = torch.randn(12, requires_grad=True)
    counts = [3, 0, 9]
    offsets = torch.tensor(counts).cumsum(0).int()
    grad = torch.randn(12, H)

    def run():
        out = grouped_linear(a, b, offsets, counts, bias, scale)
        plain = grouped_linear(a, b, offsets, counts, bias)
        return (out, plain, *torch.autograd.grad((out, plain), (a, b, bias, scale), (grad, grad)))

    fast = run()
    monkeypatch.setitem(kernels_mod._GROUPED_MM_OK, (a.device.type, a.device.index, a.dtype), False)
    loop = run()
    for x, y in zip(fast, loop):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    expected = torch.cat([a[:3] @ b[0] + scale[:3, None] * bias[0], a[3:] @ b[2] + scale[3:, None] * bias[2]])
    torch.testing.assert_close(fast[0], expected)
    assert (fast[3][1] == 0).all() and (fast[4][1] == 0).all()  # the empty group gets no gradient


def test_grouped_mm_is_probed_per_dtype():
    assert grouped_mm_supported(torch.device("cpu"), torch.float64) is False  # grouped_mm has no float64
    if hasattr(torch.nn.functional, "grouped_mm"):
        assert grouped_mm_supported(torch.device("cpu"), torch.float32) is True


def test_bfloat16_runs_close_to_float32():
    bank = make_bank(torch.float32)
    experts, weights = decision(6, 2, seed=5, empty_slots=False)
    x = torch.randn(6, 1, D)
    ref = expert_mlp(x, experts, weights.float(), bank.mlp_weights(), bank.act)
    bank16 = bank.to(torch.bfloat16)
    for strategy in STRATEGIES:
        out = expert_mlp(x.bfloat16(), experts, weights.float(), bank16.mlp_weights(), bank16.act, strategy)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_generic_dispatch_matches_reference():
    bank = make_bank()
    experts, weights = decision(7, 2, seed=6)
    x = torch.randn(7, 3, D, dtype=torch.float64, requires_grad=True)

    def expert(e, rows):
        return bank.act(rows @ bank.down_weight[e] + bank.down_bias[e]) @ bank.up_weight[e] + bank.up_bias[e]

    out = dispatch(x, experts, weights, N, D, expert)
    torch.testing.assert_close(out, reference(bank, x, experts, weights))
    single = torch.tensor([[3], [0], [5], [0], [1], [2], [3]])
    torch.testing.assert_close(
        dispatch(x, single, weights[:, :1], N, D, expert), reference(bank, x, single, weights[:, :1])
    )
    assert (dispatch(x, torch.full((7, 1), -1), weights[:, :1], N, D, expert) == 0).all()


class SliceBank(MLPExpertBank):
    """How a bank of feed-forward slices plugs in: stacked weights, no biases, its own activation."""

    def __init__(self, n, d, h):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = n, d, d
        self.wi = torch.nn.Parameter(torch.randn(n, d, h, dtype=torch.float64))
        self.wo = torch.nn.Parameter(torch.randn(n, h, d, dtype=torch.float64))
        self.act = torch.nn.functional.gelu

    def mlp_weights(self) -> ExpertMLPWeights:
        return ExpertMLPWeights(self.wi, None, self.wo, None)


@pytest.mark.parametrize("length", [1, 12])
def test_a_bank_only_supplies_its_weights(length):
    bank = SliceBank(4, D, H)
    experts, weights = decision(5, 2, seed=7, used=range(4))
    x = torch.randn(5, length, D, dtype=torch.float64)
    out = bank(x, experts, weights)
    ref = torch.zeros_like(out)
    for r, j in itertools.product(range(5), range(2)):
        e = int(experts[r, j])
        if e >= 0:
            ref[r] += weights[r, j] * (torch.nn.functional.gelu(x[r] @ bank.wi[e]) @ bank.wo[e])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("length", [1, 5])
def test_one_expert_for_every_row_runs_as_a_plain_mlp(length, monkeypatch):
    bank = make_bank()
    x = torch.randn(7, length, D, dtype=torch.float64, requires_grad=True)
    experts = torch.full((7, 1), 4)
    weights = torch.rand(7, 1, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, length, D, dtype=torch.float64)
    chosen = []
    single = strategies_mod.STRATEGIES["single"]
    monkeypatch.setitem(strategies_mod.STRATEGIES, "single", lambda *a: chosen.append(1) or single(*a))
    fast = grads_of(lambda: expert_mlp(x, experts, weights, bank.mlp_weights(), bank.act), bank, x, weights, grad_out)
    ref = grads_of(lambda: reference(bank, x, experts, weights), bank, x, weights, grad_out)
    assert chosen  # picked without being asked
    assert_same(fast, ref, rtol=1e-10, atol=1e-10)
    assert fast[1][2].abs().sum() > 0 and fast[1][2][[0, 1, 2, 3, 5]].abs().sum() == 0  # only expert 4 learns
    # a decision that mixes experts, or leaves a slot empty, cannot take the shortcut
    for bad in (torch.tensor([[4]] * 6 + [[1]]), torch.tensor([[4]] * 6 + [[-1]])):
        with pytest.raises(ValueError, match="strategy='single' needs"):
            expert_mlp(x, bad, weights, bank.mlp_weights(), bank.act, "single")


class GatedBank(MLPExpertBank):
    """Gated (GLU) experts, f_e(x) = post(silu(x @ g[e] + bg[e]) * (x @ u[e] + bu[e])) @ w[e] + b[e]."""

    def __init__(self, n=N, dtype=torch.float64, post=None):
        super().__init__()
        torch.manual_seed(3)
        self.num_experts, self.in_features, self.out_features = n, D, D
        self.gate, self.up = (torch.nn.Parameter(torch.randn(n, D, H, dtype=dtype)) for _ in range(2))
        self.gate_bias, self.up_bias = (torch.nn.Parameter(torch.randn(n, H, dtype=dtype)) for _ in range(2))
        self.down = torch.nn.Parameter(torch.randn(n, H, D, dtype=dtype))
        self.down_bias = torch.nn.Parameter(torch.randn(n, D, dtype=dtype))
        self.act = torch.nn.functional.silu
        self.post = post

    def mlp_weights(self):
        return ExpertMLPWeights(self.up, self.up_bias, self.down, self.down_bias, self.gate, self.gate_bias)

    def reference(self, x, experts, weights):
        out = torch.zeros(*x.shape[:-1], D, dtype=x.dtype)
        for r in range(x.shape[0]):
            for j in range(experts.shape[1]):
                e = int(experts[r, j])
                if e >= 0:
                    h = self.act(x[r] @ self.gate[e] + self.gate_bias[e]) * (x[r] @ self.up[e] + self.up_bias[e])
                    h = self.post(h) if self.post is not None else h
                    out[r] = out[r] + weights[r, j] * (h @ self.down[e] + self.down_bias[e])
        return out


# "single" is the shortcut for one slot per row naming one expert, so it has no k=2 case
GATED_CASES = [(s, length, k) for s in STRATEGIES + ["single"] for length in (1, 5) for k in (1, 2)
               if not (s == "single" and k > 1)]  # fmt: skip


@pytest.mark.parametrize("strategy,length,k", GATED_CASES)
def test_gated_experts_run_through_every_strategy(strategy, length, k):
    bank = GatedBank(post=lambda h: 0.5 * h)  # a post-activation step that must come after the gate's product
    if strategy == "single":
        experts, weights = torch.full((7, 1), 2), torch.rand(7, 1, dtype=torch.float64)
    else:
        experts, weights = decision(7, k, seed=k + length, used=[0, 2, 3, 5])
        weights = weights.double()
    weights.requires_grad_()
    x = torch.randn(7, length, D, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, length, D, dtype=torch.float64)
    fast = grads_of(
        lambda: (
            bank(x, experts, weights)
            if strategy is None
            else expert_mlp(x, experts, weights, bank.mlp_weights(), bank.act, strategy, post=bank.post)
        ),
        bank,
        x,
        weights,
        grad_out,
    )
    ref = grads_of(lambda: bank.reference(x, experts, weights), bank, x, weights, grad_out)
    assert_same(fast, ref, rtol=1e-10, atol=1e-10)
