import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from hf_condroute.stats.metrics import (
    active_subnetworks,
    alignment_matrix,
    block_active,
    block_metrics,
    expert_counts,
    expert_load,
    flip_rate,
    focus_cover,
    fraction_used,
    max_share,
    mean_probs_entropy,
    normalized_entropy,
    routing_flip_rate,
    routing_focus_cover,
    subnetwork_labels,
    tag_presence,
)

from .analytics_helpers import decision

# 4 examples, 3 subnetworks, 2 tags (tags 0, 0, 1, 1)
ACTIVE = [[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1]]
PRESENT = [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_focus_cover_by_hand():
    focus, cover, a = focus_cover(torch.tensor(ACTIVE).bool(), torch.tensor(PRESENT).bool())
    # A[0,2]: tag 0 in {0,1}, subnetwork 2 in {0,3}: TP 1 -> 2*1/(2+2)
    expected = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(a, expected)
    assert focus == pytest.approx((1 + 1 + 0.5) / 3)
    assert cover == pytest.approx(1.0)


def test_unused_subnetwork_lowers_focus_absent_tag_lowers_cover():
    active = torch.tensor([[1, 0], [1, 0], [1, 0]]).bool()  # subnetwork 1 never runs
    present = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]]).bool()  # tag 2 never occurs
    with pytest.warns(UserWarning, match=r"Tags \[2\] never occur"):
        focus, cover, a = focus_cover(active, present)
    # A[0,0] = 2*1/(1+3) = 0.5, A[1,0] = 2*2/(2+3) = 0.8, column 1 and row 2 all 0
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.0], [0.8, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert focus == pytest.approx((0.8 + 0.0) / 2)
    assert cover == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_alignment_matches_sklearn_f1():
    rng = np.random.default_rng(0)
    active = rng.random((50, 7)) < 0.3
    present = rng.random((50, 5)) < 0.4
    a = alignment_matrix(active, present).numpy()
    for i in range(5):
        for j in range(7):
            assert a[i, j] == pytest.approx(f1_score(present[:, i], active[:, j], zero_division=0))


def test_known_mask_leaves_out_unknown_examples():
    rng = np.random.default_rng(1)
    active = rng.random((40, 4)) < 0.5
    present = rng.random((40, 3)) < 0.5
    known = rng.random((40, 3)) < 0.7
    present &= known
    a = alignment_matrix(active, present, known).numpy()
    for i in range(3):
        rows = known[:, i]
        for j in range(4):
            assert a[i, j] == pytest.approx(f1_score(present[rows, i], active[rows, j], zero_division=0))


def test_focus_cover_bad_input():
    with pytest.raises(ValueError, match="examples"):
        focus_cover(torch.ones(3, 2).bool(), torch.ones(4, 2).bool())
    with pytest.raises(ValueError, match="boolean"):
        focus_cover(torch.full((3, 2), 0.5), torch.ones(3, 2).bool())
    with pytest.raises(ValueError, match="2-d"):
        focus_cover(torch.ones(3).bool(), torch.ones(3, 2).bool())


def test_tag_presence_single_and_multi_group():
    present, known = tag_presence(torch.tensor([2, 0, -100]), 3)
    assert present.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert known.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    tags = torch.tensor([[0, 1], [1, -100]])
    present, known = tag_presence(tags, [2, 3])  # columns: g0 t0, g0 t1, g1 t0, g1 t1, g1 t2
    assert present.tolist() == [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    assert known.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # inferred sizes: max + 1 per group
    present, _ = tag_presence(torch.tensor([[0, 2], [1, 0]]))
    assert present.shape == (2, 5)


def test_tag_presence_dae_syn_shape():
    tags = torch.randint(0, 8, (10, 4))
    present, known = tag_presence(tags, 8)
    assert present.shape == (10, 32) and bool(known.all())
    assert present.sum(1).tolist() == [4] * 10
    assert bool(present[torch.arange(10), 16 + tags[:, 2]].all())


def test_tag_presence_errors():
    with pytest.raises(ValueError, match="outside 0..2"):
        tag_presence(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="one per group"):
        tag_presence(torch.tensor([[0, 1]]), [2, 2, 2])
    with pytest.raises(ValueError, match="integer"):
        tag_presence(torch.tensor([0.5]), 2)


def test_active_subnetworks_from_decisions_top_k_and_tokens():
    routing = {
        "a": decision([[0, 1], [2, -1]], 3),  # per example, top-2; example 1 has an empty slot
        "b": decision([[[1], [1]], [[0], [-1]]], 2),  # per token; example 1's second token is padding
    }
    active = active_subnetworks(routing)
    assert active.tolist() == [[1, 1, 0, 0, 1], [0, 0, 1, 1, 0]]
    assert subnetwork_labels(routing) == ["a:0", "a:1", "a:2", "b:0", "b:1"]
    two = active_subnetworks([routing, routing])
    assert two.shape == (4, 5) and two[2:].tolist() == active.tolist()
    with pytest.raises(ValueError, match="blocks"):
        active_subnetworks([routing, {"a": routing["a"]}])


def test_routing_focus_cover_tag_routing_is_perfect():
    tags = torch.tensor([0, 1, 2, 0, 1, 2])
    routing = {"enc": decision(tags.unsqueeze(1).tolist(), 3), "dec": decision(tags.unsqueeze(1).tolist(), 3)}
    focus, cover, a = routing_focus_cover(routing, tags, 3)
    assert focus == pytest.approx(1.0) and cover == pytest.approx(1.0)
    assert a.shape == (3, 6)
    with pytest.raises(ValueError, match="exactly the routed examples"):
        routing_focus_cover(routing, tags[:4], 3)


def test_expert_counts_and_load():
    counts = expert_counts(torch.tensor([[0, 1], [1, -1], [1, 3]]), 4)
    assert counts.tolist() == [1, 3, 0, 1]
    torch.testing.assert_close(expert_load(counts), torch.tensor([0.2, 0.6, 0.0, 0.2], dtype=torch.float64))
    assert max_share(counts) == pytest.approx(0.6)
    assert fraction_used(counts) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="out of range"):
        expert_counts(torch.tensor([[4]]), 4)


def test_normalized_entropy():
    assert normalized_entropy(torch.tensor([0.25] * 4)) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)
    # [0.5, 0.5, 0, 0]: ln 2 / ln 4 = 0.5
    assert normalized_entropy(torch.tensor([0.5, 0.5, 0, 0])) == pytest.approx(0.5)
    assert normalized_entropy(torch.tensor([1.0])) == 1.0
    m = block_metrics(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert m == pytest.approx({"load_entropy": 0.5, "max_share": 0.5, "experts_used": 0.5})


def test_mean_probs_entropy_skips_padding():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.3, 0.7]]])
    experts = torch.tensor([[[0], [0]], [[1], [-1]]])
    # rows kept: 1, 0, 1 (normalised by ln 2)
    assert mean_probs_entropy(probs, experts) == pytest.approx(2 / 3)
    h = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)) / math.log(2)
    assert mean_probs_entropy(probs) == pytest.approx((1 + 0 + 1 + h) / 4)


def test_flip_rate():
    a = torch.tensor([[0, 1], [2, 3], [1, 0], [-1, -1]])
    b = torch.tensor([[1, 0], [2, 0], [1, 0], [-1, -1]])  # same set, flipped, same, padding
    assert flip_rate(a, b) == pytest.approx(1 / 3)
    ra = {"x": decision(a.tolist(), 4)}
    rb = {"x": decision(b.tolist(), 4)}
    assert routing_flip_rate(ra, rb) == pytest.approx({"x": 1 / 3})
    with pytest.raises(ValueError, match="same examples"):
        flip_rate(a, b[:2])


def test_block_active_ignores_empty_slots():
    assert block_active(decision([[-1], [1]], 2)).tolist() == [[0, 0], [0, 1]]
