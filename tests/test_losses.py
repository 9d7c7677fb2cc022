"""Auxiliary losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hf_condroute.routers import losses


def test_load_balancing_is_k_when_balanced_and_larger_when_not():
    n = 4
    probs = torch.full((8, n), 0.25)
    experts = torch.arange(8).remainder(n).unsqueeze(1)
    assert losses.load_balancing_loss(probs, experts, n).item() == pytest.approx(1.0)
    experts2 = torch.stack([torch.arange(8) % n, (torch.arange(8) + 1) % n], dim=1)
    assert losses.load_balancing_loss(probs, experts2, n).item() == pytest.approx(2.0)
    # everything to expert 0 with probability 1: N * 1 * 1 = 4
    collapsed = torch.zeros(8, n)
    collapsed[:, 0] = 1
    assert losses.load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), n).item() == pytest.approx(4.0)


def test_load_balancing_hand_example_with_empty_slot():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    experts = torch.tensor([[0], [-1]])  # the second row has no expert
    # f = (1/2, 0), P = (0.55, 0.45): 2 * (0.5 * 0.55) = 0.55
    assert losses.load_balancing_loss(probs, experts, 2).item() == pytest.approx(0.55)


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert losses.router_z_loss(logits).item() == pytest.approx(expected)


def test_tag_supervision_skips_unknown_tags():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    targets = torch.tensor([0, -100, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(-5) / (math.exp(5) + math.exp(-5)))) / 2
    assert losses.tag_supervision_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)
    none_known = losses.tag_supervision_loss(logits, torch.full((3,), -100))
    assert none_known.item() == 0.0


def test_trimmed_lasso_is_mass_outside_top_k():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert losses.trimmed_lasso_loss(probs, 1).item() == pytest.approx((0.5 + 0.75) / 2)
    assert losses.trimmed_lasso_loss(probs, 2).item() == pytest.approx((0.2 + 0.5) / 2)


def test_huber_value_loss_both_branches():
    reward = torch.tensor([0.0, 0.0])
    baseline = torch.tensor([0.5, 3.0])
    # 0.5 * 0.25 = 0.125 inside delta; 1 * (3 - 0.5) = 2.5 outside
    assert losses.huber_value_loss(reward, baseline, 1.0).item() == pytest.approx((0.125 + 2.5) / 2)


def test_policy_loss_gradient_and_detached_advantage():
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    reward = torch.tensor([1.0, -1.0])
    baseline = torch.tensor([0.5, 0.0], requires_grad=True)
    loss = losses.policy_loss(log_prob, reward, baseline)
    assert loss.item() == pytest.approx(-((0.5 * -1.0) + (-1.0 * -2.0)) / 2)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.25, 0.5]))
    assert baseline.grad is None


def test_entropy():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert losses.entropy(probs).item() == pytest.approx(math.log(2) / 2)
