"""MoEBERT neuron importance and the split of each FFN's neurons into experts."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import assign_neurons, importance_scores

from .conftest import bert_batch, t5_batch
from .moebert_helpers import FFN, tiny_bert, tiny_t5

# ----- the split ----------------------------------------------------------------------------------------


def test_split_shares_the_most_important_and_deals_the_rest_round_robin():
    importance = torch.tensor([0.5, 9.0, 0.1, 7.0, 3.0, 8.0, 0.2, 6.0, 5.0, 4.0])
    # ranking by importance: 1, 5, 3, 7, 8, 9, 4, 0, 6, 2
    index = assign_neurons(importance, num_experts=2, expert_dim=4, shared_neurons=2)
    assert index.tolist() == [sorted([1, 5, 3, 8]), sorted([1, 5, 7, 9])]
    # full coverage: shared in every expert, every other neuron in exactly one
    index = assign_neurons(importance, num_experts=4, expert_dim=4, shared_neurons=2)
    shared = {1, 5}
    rest = [set(row.tolist()) - shared for row in index]
    assert all(shared <= set(row.tolist()) for row in index)
    assert sorted(n for r in rest for n in r) == sorted(set(range(10)) - shared)
    assert [sorted(r) for r in rest] == [[3, 4], [0, 7], [6, 8], [2, 9]]
    # no shared neurons: a partition of the FFN
    index = assign_neurons(importance, num_experts=5, expert_dim=2, shared_neurons=0)
    assert sorted(index.flatten().tolist()) == list(range(10))


def test_split_leaves_out_the_least_important_when_experts_are_small():
    importance = torch.arange(12, dtype=torch.float)  # neuron 11 most important
    index = assign_neurons(importance, num_experts=3, expert_dim=3, shared_neurons=1)
    used = set(index.flatten().tolist())
    assert 11 in set.intersection(*(set(r.tolist()) for r in index))
    assert used == {11, 10, 9, 8, 7, 6, 5}  # 1 shared + 3 x 2 dealt, from the top down


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="larger than the FFN"):
        assign_neurons(torch.rand(8), 2, 9, 0)
    with pytest.raises(ValueError, match="shared_neurons=5 is larger than expert_dim=4"):
        assign_neurons(torch.rand(8), 2, 4, 5)
    with pytest.raises(ValueError, match="Use expert_dim <= 4"):
        assign_neurons(torch.rand(8), 3, 6, 2)


def test_default_expert_dim_on_a_small_ffn_names_the_ffn_size():
    # BERT-base's shared_neurons=512 on a 16-neuron FFN: the default expert size would be negative
    model = tiny_bert()
    config = RoutedFFNConfig(num_experts=4, shared_neurons=512, init_weights=False)
    with pytest.raises(
        ValueError,
        match=rf"shared_neurons=512 is larger than the FFN of bert.encoder.layer.0.intermediate, "
        rf"which has {FFN} neurons",
    ):
        get_peft_model(model, config)


# ----- importance ----------------------------------------------------------------------------------------


def test_importance_is_abs_sum_of_weight_times_gradient_per_batch():
    model = tiny_bert()
    batches = [bert_batch(seed=1), bert_batch(seed=2)]
    scores = importance_scores(model, batches)
    assert list(scores) == ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.1.intermediate"]
    expected = torch.zeros(FFN)
    layer = model.bert.encoder.layer[1]
    w_in, b_in, w_out = layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        per_neuron = (w_in * w_in.grad).sum(1) + b_in * b_in.grad + (w_out * w_out.grad).sum(0)
        expected += per_neuron.detach().abs()
    torch.testing.assert_close(scores["bert.encoder.layer.1.intermediate"], expected, rtol=1e-5, atol=1e-9)


def test_importance_leaves_the_model_as_it_was():
    model = tiny_bert()
    model.train()
    model.bert.embeddings.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    importance_scores(model, [bert_batch()])
    assert model.training and model.bert.encoder.layer[0].training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_importance_with_own_loss_and_gated_t5():
    model = tiny_t5(gated=True)
    batch = t5_batch()

    def loss_fn(m, b):  # e.g. an embedding objective for a model without labels
        return m.encoder(input_ids=b["input_ids"]).last_hidden_state.pow(2).mean()

    scores = importance_scores(model, [batch], loss_fn=loss_fn)
    assert set(scores) == {"encoder.block.0.layer.1.DenseReluDense", "decoder.block.0.layer.2.DenseReluDense"}
    assert scores["encoder.block.0.layer.1.DenseReluDense"].abs().sum() > 0
    assert scores["decoder.block.0.layer.2.DenseReluDense"].abs().sum() == 0  # the loss never reaches the decoder
    with pytest.raises(ValueError, match="returned no loss"):
        importance_scores(model, [{"input_ids": batch["input_ids"], "decoder_input_ids": batch["labels"]}])
