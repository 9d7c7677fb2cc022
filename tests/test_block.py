"""The routed block: combine maths, per-token routing, input checks, and how auxiliary losses reach gradients."""

from __future__ import annotations

import pytest
import torch

from hf_condroute import AdapterBank, RoutedBlock, RoutingConfig, RoutingInputs, RoutingStep, build_router
from hf_condroute.block.routed_block import masked_mean

D, N = 8, 4


def make_block(router="top_k", granularity="example", **kw) -> RoutedBlock:
    cfg = RoutingConfig(router=router, num_experts=N, **kw)
    cfg.validate_routing()
    torch.manual_seed(0)
    r = build_router(cfg, D, "blk")
    bank = AdapterBank(r.num_experts, D, 3, init_weights=False)
    return RoutedBlock(r, bank, granularity, name="blk")


def reference(block: RoutedBlock, x: torch.Tensor, experts, weights) -> torch.Tensor:
    """sum_j w_j f_{e_j}(x) per row, one row at a time."""
    b = block.experts
    out = torch.zeros(*x.shape[:-1], b.out_features)
    for r in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[r, j])
            if e < 0:
                continue
            h = torch.relu(x[r] @ b.down_weight[e] + b.down_bias[e])
            out[r] += weights[r, j] * (h @ b.up_weight[e] + b.up_bias[e])
    return out


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[1, 1, 0]])).item() == 2.0
    assert masked_mean(x, None).item() == pytest.approx(104 / 3)


@pytest.mark.parametrize("router", ["top_k", "softmax", "moesart", "expert_choice", "reinforce"])
def test_example_routing_matches_reference(router):
    block = make_block(router, top_k=2 if router in ("moesart", "top_k") else 1).train()
    x = torch.randn(6, 5, D)
    mask = torch.ones(6, 5)
    mask[0, 3:] = 0
    step = RoutingStep()
    torch.manual_seed(3)
    out = block(x, RoutingInputs(mask=mask, step=step))
    d = step.records["blk"].decision
    torch.testing.assert_close(out, reference(block, x, d.experts, d.weights), rtol=1e-5, atol=1e-6)
    # the router saw the mean over non-padding tokens
    block.eval()
    feats = masked_mean(x, mask)
    torch.testing.assert_close(block(x, RoutingInputs(mask=mask)), reference(block, x, *_eval_choice(block, feats)))


def _eval_choice(block, feats):
    d = block.router(feats)
    return d.experts, d.weights


def test_token_routing_skips_padding_and_reports_full_shape():
    block = make_block("top_k", "token", top_k=2).train()
    x = torch.randn(3, 4, D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    step = RoutingStep()
    out = block(x, RoutingInputs(mask=mask, step=step))
    assert (out[mask == 0] == 0).all()
    user = step.records["blk"].user_decision()
    assert user.experts.shape == (3, 4, 2) and user.probs.shape == (3, 4, N)
    assert (user.experts[mask == 0] == -1).all() and (user.experts[mask == 1] >= 0).all()
    rows = x[mask.bool()].unsqueeze(1)
    d = step.records["blk"].decision
    torch.testing.assert_close(out[mask.bool()], reference(block, rows, d.experts, d.weights).squeeze(1))


def test_hash_token_routing_uses_token_ids():
    block = make_block("hash", "token").eval()
    ids = torch.tensor([[5, 6, 5], [6, 5, 9]])
    step = RoutingStep()
    block(torch.randn(2, 3, D), RoutingInputs(token_ids=ids, step=step))
    e = step.records["blk"].user_decision().experts[..., 0]
    assert e[0, 0] == e[0, 2] == e[1, 1]  # same token, same expert
    assert e[0, 1] == e[1, 0]


def test_tags_are_never_repeated_but_library_made_features_are():
    block = make_block("tag").eval()
    # 2 tags for a batch of 6 is a user error, not beam search (generate repeats tags for beams itself)
    with pytest.raises(ValueError, match="routing_tags has 2 rows but block blk sees a batch of 6"):
        block(torch.randn(6, 2, D), RoutingInputs(tags=torch.tensor([1, 3])))
    with pytest.raises(ValueError, match="routing_tags has 4 rows but block blk sees a batch of 6"):
        block(torch.randn(6, 2, D), RoutingInputs(tags=torch.tensor([0, 1, 2, 3])))
    # the encoder's pooled output (2 examples) under 3 beams each: repeated per beam
    learned = make_block("top_k").eval()
    pooled = torch.randn(2, D)
    step = RoutingStep()
    learned(torch.randn(6, 2, D), RoutingInputs(pooled=pooled, step=step))
    probs = step.records["blk"].decision.probs
    torch.testing.assert_close(probs, learned.router(pooled).probs.repeat_interleave(3, dim=0))


@pytest.mark.parametrize(
    "tags, message",
    [
        (torch.zeros(2, 2, 2, dtype=torch.long), r"shape \(batch,\) or \(batch, groups\)"),
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.zeros(2, 1, dtype=torch.long), "tag_group=1"),
    ],
)
def test_bad_tags(tags, message):
    block = make_block("tag", tag_group=1 if tags.dim() == 2 else 0)
    with pytest.raises(ValueError, match=message):
        block(torch.randn(2, 3, D), RoutingInputs(tags=tags))


def test_tag_groups_pick_the_block_column():
    block = make_block("tag", tag_group=1).eval()
    step = RoutingStep()
    block(torch.randn(2, 3, D), RoutingInputs(tags=torch.tensor([[0, 3], [1, 2]]), step=step))
    assert step.records["blk"].decision.experts.squeeze(1).tolist() == [3, 2]


def test_tag_supervision_needs_tags_in_training():
    block = make_block("top_k", tag_supervision_coef=1.0).train()
    with pytest.raises(ValueError, match="tag_supervision_coef > 0 but got no `routing_tags`"):
        block(torch.randn(2, 3, D), RoutingInputs(step=RoutingStep()))


def _router_grads(block):
    return {n: p.grad.clone() for n, p in block.router.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_auxiliary_gradients_match_direct_computation_and_follow_loss_scale(scale):
    """Gradients injected through the combine weights equal those of adding the losses to the graph directly,
    scaled like the loss backward() was called on."""
    kw = dict(router_z_loss_coef=0.3, router_aux_loss_coef=0.2, tag_supervision_coef=0.5, trimmed_lasso_coef=0.1)
    block = make_block("top_k", **kw).train()
    x = torch.randn(6, 3, D)
    tags = torch.tensor([0, 1, -100, 3, 2, 1])
    step = RoutingStep()
    out = block(x, RoutingInputs(tags=tags, step=step))
    task = out.pow(2).mean()
    (step.add_to_loss(task) * scale).backward()
    injected = _router_grads(block)

    block.zero_grad()
    rec = step.records["blk"]
    feats = x.mean(1)
    torch.manual_seed(0)
    d = block.router(feats)  # same BatchNorm batch statistics, same deterministic choice
    y = reference(block, x, d.experts, d.weights)
    terms = block.router.loss_terms(d.logits, d.experts, None, rec.targets, None)
    assert set(terms) == {"load_balance", "z_loss", "tag_supervision", "trimmed_lasso"}
    ((y.pow(2).mean() + sum(terms.values())) * scale).backward()
    direct = _router_grads(block)
    for name in direct:
        torch.testing.assert_close(injected[name], direct[name], rtol=1e-4, atol=1e-6)


def test_reported_loss_includes_auxiliary_values():
    block = make_block("top_k", router_z_loss_coef=0.3).train()
    step = RoutingStep()
    out = block(torch.randn(4, 2, D), RoutingInputs(step=step))
    task = out.sum() * 0
    total = step.add_to_loss(task)
    assert total.item() == pytest.approx(step.loss_values["z_loss"].item())


def test_warns_when_auxiliary_losses_are_left_out_of_backward():
    block = make_block("top_k", router_z_loss_coef=0.3).train()
    step = RoutingStep()
    out = block(torch.randn(4, 2, D), RoutingInputs(step=step))
    with pytest.warns(UserWarning, match="not part of the loss you called backward"):
        out.sum().backward()


def test_reinforce_needs_a_reward_before_backward():
    block = make_block("reinforce").train()
    step = RoutingStep()
    out = block(torch.randn(4, 2, D), RoutingInputs(step=step))
    loss = step.add_to_loss(out.sum())
    with pytest.raises(RuntimeError, match="needs a reward before backward"):
        loss.backward()


def test_reinforce_learns_from_the_reward_through_the_step():
    block = make_block("reinforce", reinforce_entropy_coef=0.0).train()
    step = RoutingStep()
    out = block(torch.randn(8, 2, D), RoutingInputs(step=step))
    per_example = out.pow(2).mean(dim=(1, 2))
    step.set_reward(per_example)
    step.add_to_loss(per_example.mean()).backward()
    assert block.router.network.proj.weight.grad.abs().sum() > 0
    assert block.router.baseline.net[-1].weight.grad.abs().sum() > 0  # the value loss trains the baseline
