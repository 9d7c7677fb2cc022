"""Multi-Digits and the multi-gate CNN MoE of paper B's image benchmarks: the pairs' labels and pixels, disjoint
source digits, one output per task with a shared expert run once per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from hf_condroute.block.step import RoutingStep
from hf_condroute.studies.moesart_bench.data import CANVAS, make_multi_digits, source_pools
from hf_condroute.studies.moesart_bench.model import CNNExpertBank, MultiGateMoE, routing_config_for


@pytest.fixture(scope="module")
def splits():
    return make_multi_digits((40, 20, 20))


def test_pairs_rebuilt_by_hand_have_the_right_labels_and_pixels(splits):
    digits = load_digits()
    for split in ("train", "test"):
        data = splits[split]
        assert data.images.shape == (len(data), 1, CANVAS, CANVAS) and data.labels.shape == (len(data), 2)
        for n in range(3):
            a, b = data.sources[n].tolist()
            assert a != b
            assert data.labels[n].tolist() == [digits.target[a], digits.target[b]]
            canvas = np.zeros((20, 20), dtype=np.float32)
            for (r, c), src in (((0, 0), a), ((4, 4), b)):
                for i in range(8):
                    for j in range(8):
                        v = digits.images[src][i, j] / 16.0
                        for di in range(2):
                            for dj in range(2):
                                y, x = r + 2 * i + di, c + 2 * j + dj
                                canvas[y, x] = max(canvas[y, x], v)
            np.testing.assert_allclose(data.images[n, 0].numpy(), canvas, atol=1e-6)


def test_splits_draw_from_disjoint_source_digits(splits):
    pools = source_pools(1797)
    assert sum(len(p) for p in pools.values()) == 1797
    assert not set(pools["train"]) & set(pools["test"]) and not set(pools["val"]) & set(pools["test"])
    assert set(splits["test"].sources.flatten().tolist()) <= set(pools["test"].tolist())


class CountingCNNBank(CNNExpertBank):
    def run_expert(self, e, rows):
        self.calls.append((e, rows.shape[0]))
        return super().run_expert(e, rows)


@pytest.mark.parametrize("router", ["top_k", "moesart", "softmax"])
def test_one_output_per_task_and_each_chosen_expert_runs_once_per_row(splits, router):
    torch.manual_seed(0)
    model = MultiGateMoE(routing_config_for(router, num_experts=4, k=2))
    bank = CountingCNNBank(4)
    bank.load_state_dict(model.moe.experts.state_dict())
    model.moe.experts = bank
    bank.calls = []
    step = RoutingStep()
    images = splits["train"].images[:8]
    out = model(images, step)
    assert set(out) == {"task1", "task2"} and all(o.shape == (8, 10) for o in out.values())
    chosen = [step.records[f"moe[{t}]"].decision.experts for t in ("task1", "task2")]
    union = [(set(chosen[0][i].tolist()) | set(chosen[1][i].tolist())) - {-1} for i in range(8)]
    expected = {e: sum(e in u for u in union) for e in range(4)}
    ran = dict.fromkeys(range(4), 0)
    for e, n in bank.calls:
        ran[e] += n
    assert ran == expected  # each (row, expert) chosen by either gate ran exactly once
    assert any(chosen[0][i].tolist() != chosen[1][i].tolist() for i in range(8)) or router == "softmax"
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
