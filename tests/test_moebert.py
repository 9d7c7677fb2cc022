"""The routed FFN tuner (MoEBERT): fidelity to the dense model, save/load, and clear errors. Tiny random models:
every test runs in about a second on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

import hf_condroute
from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import (
    FFNSliceBank,
    assign_neurons,
    find_ffns,
    hidden_state_gap,
    importance_scores,
)

from .conftest import bert_batch, t5_batch
from .moebert_helpers import FFN, random_scores, tiny_bert, tiny_t5

# ----- fidelity ------------------------------------------------------------------------------------------


def whole_ffn_config(model, **kwargs) -> RoutedFFNConfig:
    defaults = dict(num_experts=3, expert_dim=FFN, shared_neurons=FFN, importance=random_scores(model))
    return RoutedFFNConfig(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "router, granularity",
    [
        ("top_k", "token"),
        ("moesart", "token"),
        ("hash", "token"),
        ("softmax", "token"),
        ("top_k", "example"),
        ("hash", "example"),
    ],
)
def test_whole_ffn_experts_equal_the_dense_bert(router, granularity):
    model = tiny_bert()
    batch = bert_batch()
    with torch.no_grad():
        dense = model(**batch, output_hidden_states=True)
    peft_model = get_peft_model(model, whole_ffn_config(model, router=router, routing_granularity=granularity)).eval()
    with torch.no_grad():
        routed = peft_model(**batch, output_hidden_states=True)
    for d, r in zip(dense.hidden_states, routed.hidden_states):
        torch.testing.assert_close(
            r[batch["attention_mask"].bool()], d[batch["attention_mask"].bool()], rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(routed.logits, dense.logits, rtol=1e-5, atol=1e-5)
    decisions = hf_condroute.get_routing(peft_model)
    assert len(decisions) == 2 and all(d.experts.shape[0] == 4 for d in decisions.values())


@pytest.mark.parametrize("gated, granularity", [(False, "token"), (True, "token"), (True, "example")])
def test_whole_ffn_experts_equal_the_dense_t5_in_training_too(gated, granularity):
    model = tiny_t5(gated)
    batch = t5_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    config = whole_ffn_config(model, router="moesart", top_k=2, routing_granularity=granularity)
    peft_model = get_peft_model(model, config)
    peft_model.train()  # MOESART samples its experts in training; weights still sum to 1
    with torch.no_grad():
        routed = peft_model(**batch).logits
    torch.testing.assert_close(routed, dense, rtol=1e-5, atol=1e-5)


def test_hidden_state_gap_is_the_relative_error_per_layer():
    model = tiny_bert()
    batch = bert_batch()
    with torch.no_grad():
        dense = model(**batch, output_hidden_states=True)
    peft_model = get_peft_model(model, RoutedFFNConfig(num_experts=4, top_k=1, importance=random_scores(model))).eval()
    gap = hidden_state_gap(peft_model, [batch])
    with torch.no_grad():
        routed = peft_model(**batch, output_hidden_states=True)
    m = batch["attention_mask"].bool()
    expected = [
        ((r - d)[m].pow(2).sum() / d[m].pow(2).sum()).item()
        for r, d in zip(routed.hidden_states[1:], dense.hidden_states[1:])
    ]
    assert gap["relative_error_per_layer"] == pytest.approx(expected, rel=1e-5)
    assert gap["relative_error"] == pytest.approx(sum(expected) / 2, rel=1e-5) and gap["relative_error"] > 1e-3
    assert gap["tokens"] == int(m.sum()) and gap["examples"] == 4 and gap["pooled_cosine"] < 1
    whole = get_peft_model(tiny_bert(), whole_ffn_config(tiny_bert(), router="top_k", top_k=2))
    exact = hidden_state_gap(whole, [batch])
    assert exact["relative_error"] < 1e-10 and exact["pooled_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_a_second_adapter_replaces_the_ffn_when_active():
    model = tiny_bert()
    batch = bert_batch()
    with torch.no_grad():
        dense = model(**batch).logits
    scores = random_scores(model)
    peft_model = get_peft_model(model, RoutedFFNConfig(num_experts=4, importance=scores)).eval()
    peft_model.add_adapter(
        "whole", RoutedFFNConfig(num_experts=2, expert_dim=FFN, shared_neurons=FFN, importance=scores)
    )
    peft_model.eval()
    peft_model.set_adapter("whole")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, dense, rtol=1e-5, atol=1e-5)
        peft_model.set_adapter("default")
        assert not torch.allclose(peft_model(**batch).logits, dense, atol=1e-3)
        peft_model.base_model.set_adapter(["default", "whole"])
        with pytest.raises(ValueError, match="only one can be active at a time"):
            peft_model(**batch)


def test_bank_runs_only_the_chosen_slices():
    model = tiny_bert()
    parts = find_ffns(model)["bert.encoder.layer.0.intermediate"]
    index = assign_neurons(torch.rand(FFN), num_experts=4, expert_dim=4, shared_neurons=0)
    bank = FFNSliceBank.from_ffn(parts, index)
    x = torch.randn(5, 1, 8)
    experts = torch.tensor([[0, 2], [1, -1], [3, 0], [2, 1], [0, 3]])
    weights = torch.rand(5, 2) * (experts >= 0)
    out = bank(x, experts, weights)
    w_in, b_in = parts.in_proj[0].weight, parts.in_proj[0].bias
    w_out, b_out = parts.out_proj.weight, parts.out_proj.bias
    for r in range(5):
        expected = torch.zeros(8)
        for e, w in zip(experts[r].tolist(), weights[r]):
            if e < 0:
                continue
            idx = index[e]
            h = torch.nn.functional.gelu(x[r, 0] @ w_in[idx].T + b_in[idx])
            expected += w * (h @ w_out[:, idx].T + b_out)
        torch.testing.assert_close(out[r, 0], expected.detach(), rtol=1e-5, atol=1e-6)
    # an expert no row chose gets no gradient
    bank(x, torch.tensor([[0], [2], [0], [2], [2]]), torch.ones(5, 1)).sum().backward()
    assert bank.wi.grad[1].abs().sum() == 0 and bank.wi.grad[3].abs().sum() == 0
    assert bank.wi.grad[0].abs().sum() > 0 and bank.wi.grad[2].abs().sum() > 0


def test_disable_adapter_gives_the_dense_model_exactly_after_training():
    model = tiny_bert()
    batch = bert_batch()
    with torch.no_grad():
        dense = model(**batch).logits
        dense_hidden = model.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    peft_model = get_peft_model(
        model, RoutedFFNConfig(num_experts=4, importance=random_scores(model), task_type="SEQ_CLS")
    )
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model(**batch).loss.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**batch).logits, dense)
    with torch.no_grad():
        assert not torch.allclose(peft_model(**batch).logits, dense)
    unloaded = peft_model.unload()  # keeps the trained classifier copy (modules_to_save), as PEFT does
    assert not any("routed_ffn" in name for name, _ in unloaded.named_modules())
    assert torch.equal(unloaded.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state, dense_hidden)


def test_hash_routing_per_token_follows_the_token_id():
    model = tiny_bert()
    peft_model = get_peft_model(model, RoutedFFNConfig(router="hash", importance=random_scores(model))).eval()
    batch = bert_batch()
    with torch.no_grad():
        peft_model(**batch)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    for decision in hf_condroute.get_routing(peft_model).values():
        chosen = decision.experts[..., 0]
        for token in ids[mask].unique():
            assert chosen[(ids == token) & mask].unique().numel() == 1
        assert (chosen[~mask] == -1).all()


def test_norm_topk_prob_makes_top_k_weights_sum_to_one():
    model = tiny_bert()
    for norm in (True, False):
        peft_model = get_peft_model(
            tiny_bert(), RoutedFFNConfig(router="top_k", top_k=2, norm_topk_prob=norm, importance=random_scores(model))
        ).eval()
        with torch.no_grad():
            peft_model(**bert_batch())
        decision = next(iter(hf_condroute.get_routing(peft_model).values()))
        mask = bert_batch()["attention_mask"].bool()
        sums = decision.weights.sum(-1)[mask]
        top2 = decision.probs.topk(2, dim=-1).values.sum(-1)[mask]
        torch.testing.assert_close(sums, torch.ones_like(sums) if norm else top2)


def test_other_architectures_through_target_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.ModuleDict({"up": nn.Linear(8, FFN), "down": nn.Linear(FFN, 8)})
            self.ffn.forward = lambda x: self.ffn["down"](torch.relu(self.ffn["up"](x)))

        def forward(self, x):
            return x + self.ffn(x)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(3, 5, 8)
    dense = model(x)
    layout = dict(target_modules=["ffn"], ffn_in_proj=["ffn.up"], ffn_out_proj="ffn.down", ffn_activation="relu")
    scores = importance_scores(
        model,
        [x],
        loss_fn=lambda m, b: m(b).pow(2).sum(),
        target_modules=["ffn"],
        layout=hf_condroute.moebert.FFNLayout("ffn", ("ffn.up",), "ffn.down", "relu"),
    )
    assert list(scores) == ["0.ffn", "1.ffn"]
    peft_model = get_peft_model(
        model, RoutedFFNConfig(num_experts=2, expert_dim=FFN, shared_neurons=FFN, importance=scores, **layout)
    ).eval()
    torch.testing.assert_close(peft_model(x), dense, rtol=1e-5, atol=1e-5)


# ----- clear errors --------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error_before_the_model_changes():
    model = tiny_bert()
    scores = random_scores(model)
    with pytest.raises(ValueError, match="needs `importance`"):
        RoutedFFNConfig(num_experts=4)
    with pytest.raises(ValueError, match="shared_neurons=9 is larger than expert_dim=8"):
        RoutedFFNConfig(expert_dim=8, shared_neurons=9, importance=scores)
    with pytest.raises(ValueError, match="larger than the FFN of bert.encoder.layer.0.intermediate, which has 16"):
        get_peft_model(model, RoutedFFNConfig(expert_dim=FFN + 1, importance=scores))
    with pytest.raises(ValueError, match="has no scores for the FFN bert.encoder.layer.1.intermediate"):
        get_peft_model(model, RoutedFFNConfig(importance={"bert.encoder.layer.0.intermediate": torch.rand(FFN)}))
    with pytest.raises(ValueError, match="has 15 scores but its FFN has 16"):
        get_peft_model(model, RoutedFFNConfig(importance=[torch.rand(15), torch.rand(15)]))
    with pytest.raises(ValueError, match="Don't know where the feed-forward pieces"):
        get_peft_model(model, RoutedFFNConfig(target_modules=["output"], importance=scores))
    with pytest.raises(ValueError, match="min_top_k|top_k >= 2"):
        RoutedFFNConfig(router="moesart", top_k=1, importance=scores)
    # nothing was replaced by the failed attempts
    assert not any("routed_ffn" in name for name, _ in model.named_modules())


# ----- save and load -------------------------------------------------------------------------------------


def test_save_and_load_in_a_fresh_process_is_exact(tmp_path):
    model = tiny_bert()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    peft_model = get_peft_model(
        model,
        RoutedFFNConfig(
            num_experts=4,
            expert_dim=5,
            shared_neurons=2,
            router="top_k",
            importance=random_scores(model),
            task_type="SEQ_CLS",
        ),
    )
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.3)
    for _ in range(2):
        peft_model(**bert_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    batch = bert_batch(seed=5)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["importance"] is None and saved["init_weights"] is False and saved["peft_type"] == "ROUTED_FFN"
    config = PeftConfig.from_pretrained(adapter_dir)
    assert isinstance(config, RoutedFFNConfig) and config.expert_dim == 5
    script = textwrap.dedent(
        f"""
        import torch, hf_condroute
        from peft import PeftModel
        from transformers import BertForSequenceClassification
        base = BertForSequenceClassification.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "batch.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "loaded.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "loaded.pt"), expected)


def test_loaded_neuron_index_and_shape_mismatch(tmp_path):
    model = tiny_bert()
    peft_model = get_peft_model(
        model, RoutedFFNConfig(num_experts=2, importance=random_scores(model), task_type="SEQ_CLS")
    )
    index = (
        peft_model.base_model.model.bert.encoder.layer[0]
        .intermediate.routed_ffn_block["default"]
        .experts.neuron_index.clone()
    )
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    loaded_index = (
        loaded.base_model.model.bert.encoder.layer[0].intermediate.routed_ffn_block["default"].experts.neuron_index
    )
    assert torch.equal(loaded_index, index) and not torch.equal(index, assign_neurons(torch.zeros(FFN), 2, 8, 0))
    other = PeftModel.from_pretrained(tiny_bert(), tmp_path, adapter_name="other")  # keys carry no adapter name
    other_block = other.base_model.model.bert.encoder.layer[0].intermediate.routed_ffn_block["other"]
    assert torch.equal(other_block.experts.neuron_index, index)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["expert_dim"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the model built from its config"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
