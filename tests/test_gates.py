"""DSelect-k and COMET: the smooth-step, the selectors, the trees, the regularisers and the exact sparsity."""

from __future__ import annotations

import math

import pytest
import torch

from hf_condroute import RoutingConfig, build_router
from hf_condroute.routers.comet import leaf_paths, leaf_probs, tree_gates
from hf_condroute.routers.dselect_k import binary_codes, selector_weights
from hf_condroute.routers.smooth_step import smooth_step

D = 5
EPS = 1e-6


def make(name: str, num_experts: int, top_k: int, **kw):
    cfg = RoutingConfig(router=name, num_experts=num_experts, top_k=top_k, router_batchnorm=False, **kw)
    cfg.validate_routing()
    torch.manual_seed(0)
    return build_router(cfg, D)


def h(q):  # the authors' entropy, written out
    return -sum(p * math.log(p + EPS) for p in q)


# ----- smooth-step ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.3, 1.0, 4.0])
def test_smooth_step_values_and_gradient(gamma):
    t = torch.tensor([-10.0, -gamma / 2, -gamma / 4, 0.0, gamma / 4, gamma / 2, 10.0, float("inf")], requires_grad=True)
    s = smooth_step(t, gamma)
    # exact 0 and 1 at and beyond +-gamma/2, 1/2 at 0, and -2/64 + 3/8 + 1/2 at gamma/4 (odd around (0, 1/2))
    expected = torch.tensor([0.0, 0.0, 1 - 0.84375, 0.5, 0.84375, 1.0, 1.0, 1.0])
    torch.testing.assert_close(s, expected)
    assert s[0] == 0 and s[1] == 0 and s[5] == 1 and s[6] == 1
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert torch.isfinite(grad).all()
    assert grad[[0, 1, 5, 6, 7]].abs().max() == 0  # no gradient once saturated
    assert grad[3].item() == pytest.approx(3 / (2 * gamma))  # the largest slope, at 0


# ----- DSelect-k -----------------------------------------------------------------------------------------------
def test_codes_are_binary_expansions_most_significant_bit_first():
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert binary_codes(1).shape == (1, 0)


def test_selector_sums_to_one_and_turns_one_hot_as_the_smooth_step_saturates():
    codes, gamma = binary_codes(8), 1.0
    z = torch.empty(16, 2, 3).uniform_(-0.45, 0.45)  # every bit inside (-gamma/2, gamma/2)
    r = selector_weights(z, codes, gamma)
    torch.testing.assert_close(r.sum(-1), torch.ones(16, 2))
    assert (r > 0).all()  # inside the cubic region: dense
    # a hand-worked selector: bits S(g/4) = 0.84375, S(0) = 0.5, S(-g/4) = 0.15625
    r = selector_weights(torch.tensor([[gamma / 4, 0.0, -gamma / 4]]), codes, gamma)[0]
    assert r[0b101].item() == pytest.approx(0.84375 * 0.5 * 0.15625)
    assert r[0b010].item() == pytest.approx(0.15625 * 0.5 * 0.84375)
    # saturating bits (|z| >= gamma/2) give a one-hot on the code of their signs
    for scale in (0.5, 1.0, 10.0):
        r = selector_weights(torch.tensor([[scale, -scale, scale]]) * gamma, codes, gamma)[0]
        assert torch.equal(r, torch.nn.functional.one_hot(torch.tensor(0b101), 8).float())


def packed(*selectors, alpha):
    return torch.cat([torch.tensor(s, dtype=torch.float32) for s in selectors] + [torch.tensor(alpha)]).unsqueeze(0)


def test_dselect_gate_mixes_its_selectors_and_lists_each_expert_once():
    router = make("dselect_k", 4, 2).train()
    big = 2.0  # saturated bits (gamma = 1)
    distinct = packed([-big, big], [big, big], alpha=[0.0, math.log(3.0)])  # expert 1 (01) and expert 3 (11)
    same = packed([-big, big], [-big, big], alpha=[0.3, -0.2])  # both selectors on expert 1
    d = router.select(torch.cat([distinct, same]), None)
    torch.testing.assert_close(d.probs, torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.0, 1.0, 0.0, 0.0]]))
    assert d.experts.tolist() == [[3, 1], [1, -1]]
    torch.testing.assert_close(d.weights, torch.tensor([[0.75, 0.25], [1.0, 0.0]]))


def test_dselect_computes_only_experts_with_weight_and_they_alone_carry_gradient():
    router = make("dselect_k", 4, 1).train()
    logits = packed([2.0, 0.0], alpha=[0.0]).requires_grad_()  # first bit saturated at 1, second undecided
    d = router.select(logits, None)
    assert sorted(d.experts[0].tolist()) == [2, 3]  # experts 0 and 1 have weight exactly 0 and are not run
    torch.testing.assert_close(d.weights, torch.tensor([[0.5, 0.5]]))
    (grad,) = torch.autograd.grad((d.weights * torch.tensor([[1.0, 3.0]])).sum(), logits)
    assert grad[0, 0] == 0 and grad[0, 1] != 0  # the saturated bit learns nothing: routing is frozen there


def test_dselect_regularisers_on_hand_worked_inputs():
    router = make("dselect_k", 3, 2, dselect_entropy_coef=2.0, dselect_reach_coef=0.5)
    # selector 1 undecided (r = 1/4 on each of the 3 real codes, 1/4 lost on the unused code 11); selector 2 on
    # expert 0; the second row has selector 2 on the unused code (no mass on real experts)
    rows = torch.cat(
        [packed([0.0, 0.0], [-2.0, -2.0], alpha=[0.0, 0.0]), packed([0.0, 0.0], [2.0, 2.0], alpha=[0.0, 0.0])]
    )
    terms = router.loss_terms(rows, None)
    entropy = ((h([0.25] * 3) + h([1.0, 0, 0])) + (h([0.25] * 3) + 0.0)) / 2
    reach = ((1 / (0.75 + EPS) + 1 / (1 + EPS)) + (1 / (0.75 + EPS) + 1 / EPS)) / 2
    assert terms["dselect_entropy"].item() == pytest.approx(2.0 * entropy, rel=1e-5)
    assert terms["dselect_reach"].item() == pytest.approx(0.5 * reach, rel=1e-5)
    # the gate's weights sum to less than one while mass sits on the unused code (not renormalised)
    torch.testing.assert_close(router.routing_probs(rows).sum(-1), torch.tensor([0.875, 0.375]))
    # N a power of two: no unused code, no reachability term
    assert "dselect_reach" not in make("dselect_k", 4, 2).loss_coefficients()


@pytest.mark.parametrize("name", ["dselect_k", "comet"])
def test_the_entropy_regulariser_makes_the_gate_k_sparse(name):
    k = 2
    gates = dict(dselect_gamma=0.25, comet_gamma=0.25, dselect_entropy_coef=1.0, comet_entropy_coef=1.0)
    router = make(name, 8, k, **gates).train()
    x = torch.randn(64, D)
    assert router(x).experts.shape[1] > k  # dense at initialisation
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(150):
        d = router(x)
        loss = sum(router.loss_terms(d.logits, d.experts).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = router(x)
    assert d.experts.shape[1] <= k  # every selector / tree saturated on one expert
    assert ((d.experts >= 0).sum(-1) >= 1).all()


# ----- COMET ---------------------------------------------------------------------------------------------------
def test_leaves_are_numbered_depth_first_left_first():
    nodes, dirs = leaf_paths(6)
    # heap layout with 5 splits: experts 0-3 hang at depth 3 under split 1, experts 4-5 at depth 2 under split 2
    assert (dirs != 0).sum(-1).tolist() == [3, 3, 3, 3, 2, 2]
    assert nodes[0].tolist() == [0, 1, 3] and dirs[0].tolist() == [1, 1, 1]
    assert nodes[3].tolist() == [0, 1, 4] and dirs[3].tolist() == [1, -1, -1]
    assert nodes[5, :2].tolist() == [0, 2] and dirs[5, :2].tolist() == [-1, -1]


def test_tree_leaf_weights_match_a_hand_computed_tree_and_sum_to_one():
    nodes, dirs = leaf_paths(3)  # split 0 -> (split 1 -> experts 0, 1), expert 2
    p = leaf_probs(torch.tensor([[0.3, 0.6]]), nodes, dirs)
    torch.testing.assert_close(p, torch.tensor([[0.3 * 0.6, 0.3 * 0.4, 0.7]]))
    for n in (2, 5, 6, 8, 11):
        nodes, dirs = leaf_paths(n)
        p = leaf_probs(torch.rand(7, 2, n - 1), nodes, dirs)
        torch.testing.assert_close(p.sum(-1), torch.ones(7, 2))


def test_tree_gate_is_one_softmax_over_all_trees_and_leaves():
    probs = torch.tensor([[[0.18, 0.12, 0.7], [0.0, 0.5, 0.5]]])
    scores = torch.tensor([[[0.4, -1.0, 0.2], [3.0, 0.1, -0.3]]], requires_grad=True)
    g = tree_gates(probs, scores)
    e = probs * scores.detach().exp()
    expected = e.sum(1) / e.sum()  # g_i = sum_t P_ti e^a_ti / sum_tj P_tj e^a_tj
    torch.testing.assert_close(g, expected)
    torch.testing.assert_close(g.sum(-1), torch.ones(1))
    (grad,) = torch.autograd.grad(g[0, 0], scores)
    assert torch.isfinite(grad).all() and grad[0, 1, 0] == 0  # an unreached leaf: no NaN, no gradient
    # a tree per softmax would give a different gate: the softmax is joint
    per_tree = (probs * scores.detach().exp() / e.sum(-1, keepdim=True)).sum(1) / 2
    assert not torch.allclose(g, per_tree)


def test_comet_router_routes_each_saturated_tree_to_one_expert_and_merges_repeats():
    router = make("comet", 4, 2)
    big = 2.0  # splits 0, 1, 2 per tree; leaves: expert 0, 1 under split 1, experts 2, 3 under split 2
    tree1 = [big, -big, 0.0]  # left, then right: expert 1
    tree2 = [-big, 0.0, big]  # right, then left: expert 2
    scores = [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0]  # a_1,1 = 0.5, a_2,2 = 1.5
    splits = torch.tensor([tree1, tree2]).reshape(-1)
    row = torch.cat([splits, torch.tensor(scores)]).unsqueeze(0)
    repeat = torch.cat([torch.tensor([tree1, tree1]).reshape(-1), torch.tensor(scores)]).unsqueeze(0)
    d = router.select(torch.cat([row, repeat]), None)
    w2 = math.exp(1.5) / (math.exp(1.5) + math.exp(0.5))
    assert d.experts.tolist() == [[2, 1], [1, -1]]
    torch.testing.assert_close(d.weights, torch.tensor([[w2, 1 - w2], [1.0, 0.0]]))


def test_comet_regulariser_on_hand_worked_inputs():
    router = make("comet", 3, 2, comet_entropy_coef=3.0)
    # tree 1 undecided (P = 1/4, 1/4, 1/2); tree 2 saturated on expert 2 (P one-hot)
    splits = torch.tensor([[0.0, 0.0], [-2.0, 0.0]]).reshape(-1)
    rows = torch.cat([splits, torch.zeros(6)]).unsqueeze(0)
    terms = router.loss_terms(rows, None)
    assert terms["comet_entropy"].item() == pytest.approx(3.0 * (h([0.25, 0.25, 0.5]) + h([0.0, 0.0, 1.0])), rel=1e-5)


@pytest.mark.parametrize("name", ["dselect_k", "comet"])
def test_gates_refuse_softmax_only_settings(name):
    with pytest.raises(ValueError, match=r"router_z_loss_coef=0\.1 has nothing to act on.*router_z_loss_coef=0\.0"):
        RoutingConfig(router=name, router_z_loss_coef=0.1).validate_routing()
    with pytest.raises(ValueError, match="router_temperature"):
        RoutingConfig(router=name, router_temperature=2.0).validate_routing()
    with pytest.raises(ValueError, match="gamma must be > 0"):
        RoutingConfig(router=name, dselect_gamma=0.0, comet_gamma=0.0).validate_routing()


@pytest.mark.parametrize("name", ["dselect_k", "comet"])
def test_generic_losses_see_the_gate_weights(name):
    router = make(name, 4, 2, router_aux_loss_coef=1.0, tag_supervision_coef=1.0, trimmed_lasso_coef=1.0).train()
    d = router(torch.randn(8, D))
    targets = torch.tensor([0, 1, 2, 3, -100, 0, 1, 2])
    terms = router.loss_terms(d.logits, d.experts, None, targets)
    g = router.routing_probs(d.logits)
    torch.testing.assert_close(g, d.probs)
    known = targets != -100
    nll = -(g[known] / g[known].sum(-1, keepdim=True)).gather(1, targets[known].unsqueeze(1)).log().mean()
    torch.testing.assert_close(terms["tag_supervision"], nll)
    torch.testing.assert_close(terms["trimmed_lasso"], (g.sum(-1) - g.topk(2, dim=-1).values.sum(-1)).mean())
