"""Each router's maths: sparsity, weights, which parameters learn, and the properties the papers state."""

from __future__ import annotations

import math

import pytest
import torch

from hf_condroute import ROUTERS, RoutingConfig, build_router
from hf_condroute.routers.gumbel import straight_through
from hf_condroute.routers.hashing import block_salt, content_keys, mix
from hf_condroute.routers.moesart import adjusted_weights, inverse_cdf_sample, unique_with_counts
from hf_condroute.routers.reinforce import plackett_luce_log_prob

D, N = 6, 4


def make(name: str, block_name: str = "block.0", **kw):
    cfg = RoutingConfig(router=name, num_experts=kw.pop("num_experts", N), **kw)
    cfg.validate_routing()
    torch.manual_seed(0)
    return build_router(cfg, D, block_name=block_name)


def rows(r: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(r, D, generator=torch.Generator().manual_seed(seed))


def test_registry_names():
    expected = {
        "tag",
        "hash",
        "monolithic",
        "top_k",
        "st_gumbel",
        "reinforce",
        "softmax",
        "v_moe",
        "smoe",
        "expert_choice",
        "x_moe",
        "moesart",
        "smear",
        "dselect_k",
        "comet",
    }
    assert set(ROUTERS) == expected


@pytest.mark.parametrize("name", ["top_k", "st_gumbel", "reinforce", "v_moe", "smoe", "x_moe", "moesart"])
@pytest.mark.parametrize("train", [True, False])
def test_k_sparse_routers_choose_k_distinct_experts(name, train):
    k = 2
    router = make(name, top_k=k).train(train)
    d = router(rows())
    assert d.experts.shape == (16, k) and d.weights.shape == (16, k) and d.probs.shape == (16, N)
    assert ((d.experts >= 0) & (d.experts < N)).all()
    assert (d.experts[:, 0] != d.experts[:, 1]).all()
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(16))


@pytest.mark.parametrize("name", ["st_gumbel", "reinforce", "v_moe", "smoe", "moesart"])
def test_stochastic_routers_are_deterministic_in_eval(name):
    router = make(name, top_k=2).eval()
    x = rows()
    a, b = router(x), router(x)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)
    # evaluation picks the most probable experts
    assert torch.equal(a.experts, a.probs.topk(2, dim=-1).indices)


def test_top_k_weights_are_the_chosen_probabilities_and_train_the_router():
    router = make("top_k", top_k=2).train()
    d = router(rows())
    torch.testing.assert_close(d.weights, d.probs.gather(1, d.experts))
    d.weights.sum().backward()
    assert router.network.proj.weight.grad.abs().sum() > 0


def test_softmax_router_is_dense():
    d = make("softmax").train()(rows())
    assert d.experts.shape == (16, N)
    assert torch.equal(d.experts, torch.arange(N).expand(16, N))
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(16))


def test_v_moe_noise_only_in_training():
    router = make("v_moe", top_k=1, vmoe_noise_std=10.0, router_batchnorm=False)
    x = rows(256)
    router.eval()
    clean = router(x)
    router.train()
    noisy = router(x)
    router.eval()
    assert torch.equal(router(x).experts, clean.experts)
    assert (noisy.experts != clean.experts).float().mean() > 0.3  # large noise changes many choices


def test_smoe_multiplies_router_input_by_uniform_noise():
    router = make("smoe", router_batchnorm=False)
    assert router.jitter == pytest.approx(0.02)
    router.train()
    x = rows()
    logits = [router.compute_logits(x) for _ in range(2)]
    assert not torch.equal(logits[0], logits[1])
    # the noise is a factor in [0.98, 1.02] per input feature: logits stay within that band of the clean ones
    clean = router.network(x)
    bound = (router.network.proj.weight.abs() @ (0.02 * x.abs()).t()).t() + 1e-6
    assert ((logits[0] - clean).abs() <= bound).all()
    router.eval()
    torch.testing.assert_close(router.compute_logits(x), clean)


def test_expert_choice_each_expert_takes_its_capacity():
    router = make("expert_choice", top_k=1).train()
    d = router(rows(16))
    capacity = math.ceil(16 * 1 / N)
    counts = torch.bincount(d.experts[d.experts >= 0], minlength=N)
    assert counts.tolist() == [capacity] * N
    chosen = d.experts >= 0
    torch.testing.assert_close(d.weights[chosen], d.probs.gather(1, d.experts.clamp(min=0))[chosen])
    assert (d.weights[~chosen] == 0).all()
    # each expert took the rows that rate it highest
    for e in range(N):
        rows_e = (d.experts == e).any(dim=1).nonzero().squeeze(1)
        best = d.probs[:, e].topk(capacity).indices
        assert set(rows_e.tolist()) == set(best.tolist())


def test_x_moe_logits_are_scaled_cosines():
    router = make("x_moe", xmoe_temperature=0.5, router_batchnorm=False).eval()
    logits = router.compute_logits(rows())
    assert logits.abs().max() <= 1 / 0.5 + 1e-5
    assert router.network.proj.out_features == max(2, N // 2)


# ----- straight-through Gumbel ----------------------------------------------------------------------
def test_straight_through_multiplier_is_one_forward_and_passes_the_gradient():
    soft = torch.tensor([0.2, 0.7], requires_grad=True)
    m = straight_through(soft)
    assert torch.equal(m.detach(), torch.ones(2))
    (m * torch.tensor([3.0, 5.0])).sum().backward()
    torch.testing.assert_close(soft.grad, torch.tensor([3.0, 5.0]))


def test_st_gumbel_forward_weights_are_one_and_router_learns():
    router = make("st_gumbel").train()
    d = router(rows(), step=1)
    assert torch.equal(d.weights.detach(), torch.ones_like(d.weights))
    (d.weights * torch.randn_like(d.weights)).sum().backward()
    assert router.network.proj.weight.grad.abs().sum() > 0


def test_st_gumbel_temperature_schedule_counts_each_step_once():
    router = make("st_gumbel", gumbel_temperature_start=10.0, gumbel_temperature_min=0.5, gumbel_anneal_rate=0.1)
    router.train()
    x = rows()
    router(x, step=1)
    router(x, step=1)  # a gradient-checkpointing recomputation of the same step
    assert int(router.num_updates) == 1
    assert router.temperature() == pytest.approx(10.0 * math.exp(-0.1))
    for s in range(2, 200):
        router(x, step=s)
    assert router.temperature() == pytest.approx(0.5)


# ----- REINFORCE ----------------------------------------------------------------------------------
def test_reinforce_baseline_converges_to_mean_reward():
    router = make("reinforce", reinforce_policy_coef=0.0, reinforce_entropy_coef=0.0, reinforce_value_coef=1.0)
    router.train()
    opt = torch.optim.Adam(router.baseline.parameters(), lr=0.05)
    x = rows(64)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        reward = 3.0 + torch.randn(64, generator=g)  # a fixed reward distribution, mean 3
        d = router(x)
        loss = sum(router.loss_terms(d.logits, d.experts, d.baseline, None, reward).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert router(x).baseline.mean().item() == pytest.approx(3.0, abs=0.25)


def test_reinforce_policy_gradient_raises_probability_of_rewarded_expert():
    router = make("reinforce", reinforce_entropy_coef=0.0, reinforce_value_coef=0.0, reinforce_policy_coef=1.0)
    router.train()
    x = rows(256)
    d = router(x)
    reward = (d.experts[:, 0] == 2).float()  # only expert 2 is rewarded; the baseline starts at 0
    terms = router.loss_terms(d.logits, d.experts, d.baseline, None, reward)
    grad = torch.autograd.grad(terms["reinforce_policy"], d.logits)[0]
    # minimising the loss moves logits against the gradient: expert 2's logit goes up
    assert (-grad[:, 2]).mean() > 0
    assert (-grad[:, [0, 1, 3]]).mean() < 0


def test_reinforce_entropy_is_a_bonus():
    router = make("reinforce", reinforce_entropy_coef=1.0)
    router.train()
    d = router(rows())
    terms = router.loss_terms(d.logits, d.experts, d.baseline, None, None)
    probs = d.logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(terms["reinforce_entropy"], -entropy)


def test_reinforce_task_loss_does_not_reach_router():
    router = make("reinforce").train()
    d = router(rows())
    assert not d.weights.requires_grad  # weights 1/k: only the policy gradient trains the router


def test_plackett_luce_log_prob():
    log_probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    experts = torch.tensor([[1, 0]])
    expected = math.log(0.3) + math.log(0.5 / 0.7)
    assert plackett_luce_log_prob(log_probs, experts).item() == pytest.approx(expected, rel=1e-5)


# ----- MOESART --------------------------------------------------------------------------------------
def test_inverse_cdf_sampling_without_replacement_gives_distinct_experts_with_the_right_marginals():
    probs = torch.tensor([[0.6, 0.3, 0.1]]).expand(20000, 3)
    torch.manual_seed(0)
    draws = inverse_cdf_sample(probs, 1, replacement=False)
    freq = torch.bincount(draws[:, 0], minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)
    draws2 = inverse_cdf_sample(probs, 2, replacement=False)
    assert (draws2[:, 0] != draws2[:, 1]).all()


def test_strategy_iii_is_unbiased_in_expectation():
    """Paper B Theorem 1: with sampling with replacement, E[g_tilde_i] = g_i under adjustment (iii)."""
    torch.manual_seed(0)
    logits = torch.tensor([[1.2, 0.1, -0.5, 0.7]])
    g = logits.softmax(-1)
    k, draws_n = 3, 40000
    rep = logits.expand(draws_n, 4)
    draws = inverse_cdf_sample(rep.softmax(-1), k, replacement=True)
    experts, counts = unique_with_counts(draws, 4)
    w = adjusted_weights(rep, experts, counts, k, "iii")
    g_tilde = torch.zeros(draws_n, 4).scatter_add_(1, experts.clamp(min=0), w)
    torch.testing.assert_close(g_tilde.mean(0), g[0], atol=0.01, rtol=0)
    # strategy (i) is biased for this non-uniform g
    w_i = adjusted_weights(rep, experts, counts, k, "i")
    biased = torch.zeros(draws_n, 4).scatter_add_(1, experts.clamp(min=0), w_i).mean(0)
    assert (biased - g[0]).abs().max() > 0.03


def test_eq3_passes_router_gradient_and_iii_does_not():
    logits = torch.tensor([[1.2, 0.1, -0.5, 0.7]], requires_grad=True)
    experts = torch.tensor([[0, 3]])
    counts = torch.ones_like(experts)
    out = torch.tensor([[2.0, -1.0]])  # two expert outputs
    w3 = adjusted_weights(logits, experts, counts, 2, "moesart", z=torch.tensor([0]))
    g3 = torch.autograd.grad((w3 * out).sum(), logits)[0]
    assert g3.abs().sum() > 1e-4
    w_iii = adjusted_weights(logits, experts, counts, 2, "iii")
    torch.testing.assert_close(w_iii.detach(), torch.tensor([[0.5, 0.5]]))
    g_iii = torch.autograd.grad((w_iii * out).sum(), logits)[0]
    assert g_iii.abs().max() < 1e-6


def test_eq3_closed_form():
    """With r_i = 1: w_z = g_z / (1 + g_z) and every other selected expert gets 1 / ((k-1)(1 + g_z))."""
    logits = torch.tensor([[0.3, -0.2, 1.0, 0.5, 0.0]])
    g = logits.softmax(-1)[0]
    experts = torch.tensor([[2, 0, 4]])
    w = adjusted_weights(logits, experts, torch.ones_like(experts), 3, "moesart", z=torch.tensor([1]))[0]
    gz = g[0]
    torch.testing.assert_close(w, torch.tensor([1 / (2 * (1 + gz)), gz / (1 + gz), 1 / (2 * (1 + gz))]))


def test_moesart_router_training_and_eval():
    router = make("moesart", top_k=2).train()
    d = router(rows())
    assert (d.experts[:, 0] != d.experts[:, 1]).all()
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(16))
    d.weights[:, 0].sum().backward()
    assert router.network.proj.weight.grad.abs().sum() > 0
    router.eval()
    e = router(rows())
    torch.testing.assert_close(e.weights, torch.full((16, 2), 0.5))


def test_moesart_with_replacement_collapses_repeats():
    router = make("moesart", top_k=3, moesart_replacement=True, router_init_std=5.0).train()
    d = router(rows(64))
    for row_e, row_w in zip(d.experts, d.weights):
        kept = row_e[row_e >= 0]
        assert len(set(kept.tolist())) == len(kept)
        assert (row_w[row_e < 0] == 0).all()
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(64))


# ----- heuristic routers -------------------------------------------------------------------------
def test_tag_router_follows_tags_and_mapping():
    router = make("tag")
    tags = torch.tensor([0, 3, 1, 2])
    assert router(rows(4), tags=tags).experts.squeeze(1).tolist() == [0, 3, 1, 2]
    plus = make("tag", tag_to_expert=[0, 1, 1, 3, 2])  # Tag+: tag 2 shares tag 1's expert
    assert plus(rows(5), tags=torch.tensor([0, 1, 2, 3, 4])).experts.squeeze(1).tolist() == [0, 1, 1, 3, 2]


def test_tag_to_expert_pattern_applies_per_block():
    cfg = RoutingConfig(router="tag", num_experts=3, tag_to_expert_pattern={r"^encoder\.": [0, 0, 2]})
    enc = build_router(cfg, D, "encoder.block.0.o")
    dec = build_router(cfg, D, "decoder.block.0.o")
    tags = torch.tensor([0, 1, 2])
    assert enc(rows(3), tags=tags).experts.squeeze(1).tolist() == [0, 0, 2]
    assert dec(rows(3), tags=tags).experts.squeeze(1).tolist() == [0, 1, 2]


def test_tag_router_errors():
    router = make("tag")
    with pytest.raises(ValueError, match="needs `routing_tags`"):
        router(rows(2))
    with pytest.raises(ValueError, match=r"out of range.*got \[7\].*0\.\.3"):
        router(rows(2), tags=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="-100"):
        router(rows(2), tags=torch.tensor([0, -100]))


def test_hash_router_is_stable_and_spread():
    keys = torch.arange(4000)
    a = make("hash", block_name="enc.0")(rows(4000), keys=keys).experts.squeeze(1)
    b = make("hash", block_name="enc.0")(rows(4000), keys=keys).experts.squeeze(1)  # a rebuilt router
    c = make("hash", block_name="enc.1")(rows(4000), keys=keys).experts.squeeze(1)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.6  # blocks route independently (expected 1 - 1/N = 0.75)
    share = torch.bincount(a, minlength=N).float() / 4000
    assert (share - 0.25).abs().max() < 0.03


def test_hash_values_are_pinned():
    """Saved hash-routed models depend on these exact values: changing the hashing re-routes every example."""
    assert block_salt("enc.0") == 726057961
    assert mix(torch.tensor([0, 1, 12345, 2**40]), block_salt("enc.0")).tolist() == [
        1306070293,
        1053460960,
        824582224,
        1473298019,
    ]
    assert content_keys(torch.tensor([[5, 6, 7]])).tolist() == [678415024]


def test_content_keys_ignore_padding_side():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    k = content_keys(ids, mask)
    assert k[0] == k[1] and k[0] != k[2]


def test_monolithic_router_has_one_expert():
    router = make("monolithic")
    assert router.num_experts == 1
    assert (router(rows()).experts == 0).all()


def test_batchnorm_router_refuses_single_row_in_training():
    router = make("top_k").train()
    with pytest.raises(ValueError, match="at least 2"):
        router(rows(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(router="nope"), r"Unknown router 'nope'\. Valid routers: tag, hash"),
        (dict(router="top_k", top_k=5, num_experts=4), "top_k=5 is larger than num_experts=4"),
        (dict(router="moesart", top_k=1), "needs top_k >= 2"),
        (dict(router="tag", num_experts=2, tag_to_expert=[0, 5]), "outside 0..1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**kwargs).validate_routing()


def test_router_logits_are_float32_under_autocast_and_divided_by_the_temperature():
    x = torch.randn(5, D)
    plain = make("top_k").eval()
    reference = plain.network(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = plain.compute_logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)  # autocast is off inside the router
    hot = make("top_k", router_temperature=2.0).eval()
    hot.load_state_dict(plain.state_dict())
    torch.testing.assert_close(hot.compute_logits(x), reference / 2.0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_keep_their_parameters_in_submodules(name):
    # DeepSpeed ZeRO-3 cannot see the tensors inside a RoutingDecision, so it attaches no backward hook to a router
    # (it warns so); those hooks would only gather the router module's own parameters, and a router has none: they
    # live in its network and baseline, whose outputs are tensors (README, DeepSpeed)
    router = make(name, top_k=2 if name == "moesart" else 1)
    assert list(router.parameters(recurse=False)) == []
