import math

import pytest
import torch

from hf_condroute.stats import (
    RoutingStats,
    RoutingStatsAccumulator,
    compute_routing_stats,
    get_routing_stats,
    set_routing_stats,
)
from hf_condroute.stats.metrics import routing_focus_cover

from .analytics_helpers import collate, decision, tagged_seq2seq, tiny_bert_model, tiny_t5_model


def batch_a():
    # block x: 2 experts, top-1; block y: 3 experts, top-2 (one empty slot)
    return {
        "x": decision([[0], [0], [1]], probs=[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]),
        "y": decision([[0, 1], [2, -1], [1, 2]], probs=[[0.4, 0.4, 0.2], [0.0, 0.0, 1.0], [0.2, 0.4, 0.4]]),
    }


def batch_b():
    return {
        "x": decision([[1], [1]], probs=[[0.0, 1.0], [0.5, 0.5]]),
        "y": decision([[0, 2], [0, 1]], probs=[[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]),
    }


def test_accumulator_counts_by_hand():
    acc = RoutingStatsAccumulator()
    acc.update(batch_a())
    acc.update(batch_b())
    stats = acc.compute("eval")
    x, y = stats.blocks["x"], stats.blocks["y"]
    assert stats.examples == 5
    assert x.counts == [2.0, 3.0] and x.rows == 5 and x.top_k == 1
    assert x.load == pytest.approx([0.4, 0.6])
    # row entropies of x (normalised by ln 2): 1, 0, 0, 0, 1
    assert x.probs_entropy == pytest.approx(2 / 5)
    assert y.counts == [3.0, 3.0, 3.0] and y.top_k == 2
    assert y.load_entropy == pytest.approx(1.0) and y.max_share == pytest.approx(1 / 3)
    h = lambda p: -sum(q * math.log(q) for q in p if q > 0) / math.log(3)  # noqa: E731
    expected = (h([0.4, 0.4, 0.2]) + 0 + h([0.2, 0.4, 0.4]) + h([0.5, 0.5]) + h([0.5, 0.5])) / 5
    assert y.probs_entropy == pytest.approx(expected)
    summary = stats.summary()
    assert summary["max_share"] == pytest.approx(0.6)
    assert summary["experts_used"] == pytest.approx(1.0)
    assert summary["load_entropy"] == pytest.approx((x.load_entropy + 1.0) / 2)


def test_accumulated_focus_cover_equals_one_shot_with_growing_tags():
    tags_a, tags_b = torch.tensor([0, 0, 2]), torch.tensor([1, 2])
    acc = RoutingStatsAccumulator()
    acc.update(batch_a(), tags_a)  # only tags 0 and 2 seen so far
    acc.update(batch_b(), tags_b)
    stats = acc.compute("eval")
    focus, cover, alignment = routing_focus_cover([batch_a(), batch_b()], torch.cat([tags_a, tags_b]), 3)
    assert stats.focus == pytest.approx(focus) and stats.cover == pytest.approx(cover)
    assert torch.tensor(stats.alignment) == pytest.approx(alignment)
    assert stats.tag_labels == ["0", "1", "2"] and stats.tag_counts == [2.0, 1.0, 2.0]
    assert stats.subnetwork_labels == ["x:0", "x:1", "y:0", "y:1", "y:2"]


def test_multi_group_tags_with_unknown_and_names():
    tags_a = torch.tensor([[0, 1], [1, -100], [0, 0]])
    tags_b = torch.tensor([[1, 1], [-100, 0]])
    acc = RoutingStatsAccumulator(tags_per_group=2, tag_names=["a0", "a1", "b0", "b1"])
    acc.update(batch_a(), tags_a)
    acc.update(batch_b(), tags_b)
    stats = acc.compute("eval")
    focus, cover, alignment = routing_focus_cover([batch_a(), batch_b()], torch.cat([tags_a, tags_b]), 2)
    assert stats.focus == pytest.approx(focus) and stats.cover == pytest.approx(cover)
    assert torch.tensor(stats.alignment) == pytest.approx(alignment)
    assert stats.tag_labels == ["a0", "a1", "b0", "b1"]


def test_tags_must_match_routed_rows_and_groups():
    acc = RoutingStatsAccumulator()
    with pytest.raises(ValueError, match="routing_tags has 2 rows"):
        acc.update(batch_a(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one per group"):
        RoutingStatsAccumulator(tags_per_group=[2, 2]).update(batch_a(), torch.tensor([0, 1, 1]))


def test_aux_losses_are_averaged_per_step():
    acc = RoutingStatsAccumulator()
    acc.update(batch_a(), losses={"load_balance": torch.tensor(0.2)})
    acc.update(batch_b(), losses={"load_balance": torch.tensor(0.4)})
    assert acc.compute("train").aux_losses == pytest.approx({"load_balance": 0.3})


def test_flip_rate_against_previous_decisions():
    before = RoutingStatsAccumulator(keep_decisions=True)
    before.update(batch_a())
    after = RoutingStatsAccumulator(keep_decisions=True)
    changed = batch_a()
    changed["x"] = decision([[1], [0], [1]], probs=[[0.5, 0.5]] * 3)  # row 0 flips
    changed["y"] = decision([[1, 0], [2, -1], [2, 0]], probs=[[1 / 3] * 3] * 3)  # same set, same, flipped
    after.update(changed)
    after.compare_decisions(before.decisions)
    # 6 routed rows over both blocks, 2 flipped
    assert after.compute("eval").flip_rate == pytest.approx(2 / 6)
    mismatched = RoutingStatsAccumulator(keep_decisions=True)
    mismatched.update(batch_b())
    mismatched.compare_decisions(before.decisions)
    assert mismatched.compute("eval").flip_rate is None


def test_merging_states_equals_one_accumulator():
    full = RoutingStatsAccumulator()
    full.update(batch_a(), torch.tensor([0, 1, 1]), {"z_loss": torch.tensor(1.0)})
    full.update(batch_b(), torch.tensor([2, 0]), {"z_loss": torch.tensor(3.0)})
    one, two = RoutingStatsAccumulator(), RoutingStatsAccumulator()
    one.update(batch_a(), torch.tensor([0, 1, 1]), {"z_loss": torch.tensor(1.0)})
    two.update(batch_b(), torch.tensor([2, 0]), {"z_loss": torch.tensor(3.0)})
    merged = RoutingStatsAccumulator()
    merged._add_state(one.state())
    merged._add_state(two.state())
    assert merged.compute("eval").to_dict() == full.compute("eval").to_dict()


def test_stats_roundtrip_through_dict():
    acc = RoutingStatsAccumulator()
    acc.update(batch_a(), torch.tensor([0, 1, 1]))
    stats = acc.compute("eval", global_step=7)
    again = RoutingStats.from_dict(stats.to_dict())
    assert again.to_dict() == stats.to_dict()


def test_compute_routing_stats_tag_routing_is_perfectly_aligned():
    model = tiny_t5_model(router="tag", num_experts=2)
    loader = torch.utils.data.DataLoader(tagged_seq2seq(8), batch_size=4, collate_fn=collate)
    stats = compute_routing_stats(model, loader, tags_per_group=2)
    assert stats.examples == 8 and len(stats.blocks) == 4
    assert stats.focus == pytest.approx(1.0) and stats.cover == pytest.approx(1.0)
    for block in stats.blocks.values():
        assert block.counts == [4.0, 4.0] and block.router == "tag" and block.learned is False
    assert get_routing_stats(model)["eval"] is stats
    assert model.training  # restored


def test_compute_routing_stats_per_token_counts_exclude_padding():
    model = tiny_bert_model(router="top_k", num_experts=3, top_k=2, routing_granularity="token")
    input_ids = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0], [8, 9, 10, 0]])
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": torch.tensor([0, 1, 0])}
    stats = compute_routing_stats(model, [batch], split="probe")
    for block in stats.blocks.values():
        assert block.rows == 9  # non-padding tokens
        assert sum(block.counts) == 18  # two experts each
        assert block.granularity == "token"
    assert stats.focus is None
    assert set(get_routing_stats(model)) == {"probe"}


def test_compute_routing_stats_errors():
    model = tiny_bert_model()
    with pytest.raises(TypeError, match="batches that map input names to tensors"):
        compute_routing_stats(model, [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="no batches"):
        compute_routing_stats(model, [])
    with pytest.raises(ValueError, match="no routed layers"):
        set_routing_stats(torch.nn.Linear(2, 2), RoutingStats("eval", 0, {}))


def _merge_worker(rank, world, path, out):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP thread pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    acc = RoutingStatsAccumulator()
    if rank == 0:
        acc.update(batch_a(), torch.tensor([0, 1, 1]), {"z_loss": torch.tensor(1.0)})
    else:
        acc.update(batch_b(), torch.tensor([2, 0]), {"z_loss": torch.tensor(3.0)})
    acc.merge_processes()
    out[rank] = acc.compute("eval").to_dict()
    torch.distributed.destroy_process_group()


def test_merge_processes_under_torch_distributed(tmp_path):
    full = RoutingStatsAccumulator()
    full.update(batch_a(), torch.tensor([0, 1, 1]), {"z_loss": torch.tensor(1.0)})
    full.update(batch_b(), torch.tensor([2, 0]), {"z_loss": torch.tensor(3.0)})
    manager = torch.multiprocessing.Manager()
    out = manager.dict()
    # fork: the workers inherit the imported modules instead of importing transformers again
    torch.multiprocessing.start_processes(
        _merge_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, start_method="fork"
    )
    expected = full.compute("eval").to_dict()
    assert out[0] == expected and out[1] == expected
