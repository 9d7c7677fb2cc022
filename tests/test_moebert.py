"""The routed FFN tuner (MoEBERT): importance, the neuron split, fidelity to the dense model, save/load,
distillation, and clear errors. Tiny random models: every test runs in about a second on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn
from transformers import BertForSequenceClassification, T5ForConditionalGeneration

import hf_condroute
from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import (
    DistillationTrainer,
    FFNSliceBank,
    assign_neurons,
    distillation_loss,
    find_ffns,
    hidden_state_gap,
    hidden_state_loss,
    importance_scores,
    logit_loss,
)

from .conftest import bert_batch, make_bert, make_t5, t5_batch

FFN = 16  # intermediate size of the tiny models


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    # initializer_range 0.3: an FFN that matters, so routing errors show in the hidden states
    return make_bert(
        seed,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=FFN,
        initializer_range=0.3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def tiny_t5(gated: bool, seed: int = 0) -> T5ForConditionalGeneration:
    return make_t5(
        seed,
        d_model=8,
        d_ff=FFN,
        d_kv=4,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def random_scores(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(parts.ffn_dim, generator=g) for name, parts in find_ffns(model).items()}


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


# ----- distillation --------------------------------------------------------------------------------------


def test_distillation_loss_terms_match_their_definitions():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s_h = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    t_h = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    s_h[0] = t_h[0]
    student = SimpleNamespace(hidden_states=tuple(s_h), logits=torch.randn(2, 5, generator=g))
    teacher = SimpleNamespace(hidden_states=tuple(t_h), logits=torch.randn(2, 5, generator=g))
    expected_hidden = sum(((s - t) ** 2).mean(-1)[mask.bool()].mean() for s, t in zip(s_h[1:], t_h[1:]))
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask), expected_hidden)
    p_t = teacher.logits.softmax(-1)
    expected_kl = (p_t * (p_t.log() - student.logits.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(logit_loss(student.logits, teacher.logits), expected_kl)
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected_hidden + expected_kl)
    reg_s, reg_t = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    torch.testing.assert_close(logit_loss(reg_s, reg_t), ((reg_s - reg_t) ** 2).mean())


def test_distillation_loss_of_an_encoder_decoder_reaches_the_experts():
    from hf_condroute.moebert import teacher_outputs

    model = tiny_t5(gated=True)
    peft_model = get_peft_model(model, RoutedFFNConfig(num_experts=4, importance=random_scores(model))).train()
    batch = t5_batch()
    teacher = teacher_outputs(peft_model, batch)
    student = peft_model(**batch, output_hidden_states=True)
    loss = distillation_loss(student, teacher, batch["attention_mask"], labels=batch["labels"])
    # encoder and decoder layers both count: 1 + 1 hidden-state terms, plus the per-token KL where labels are set
    s_h, t_h = student.encoder_hidden_states[1], teacher.encoder_hidden_states[1]
    assert loss > hidden_state_loss(student, teacher, batch["attention_mask"]) > 0
    assert (
        hidden_state_loss(student, teacher, batch["attention_mask"])
        > ((s_h - t_h) ** 2).mean(-1)[batch["attention_mask"].bool()].mean()
    )
    loss.backward()
    encoder_bank = (
        peft_model.base_model.model.encoder.block[0].layer[1].DenseReluDense.routed_ffn_block["default"].experts
    )
    decoder_bank = (
        peft_model.base_model.model.decoder.block[0].layer[2].DenseReluDense.routed_ffn_block["default"].experts
    )
    assert encoder_bank.wi_gate.grad.abs().sum() > 0 and decoder_bank.wo.grad.abs().sum() > 0


def _trainer(peft_model, tmp_path, steps, dataset, **kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    return DistillationTrainer(model=peft_model, args=args, train_dataset=dataset, distill_coef=2.0)


def _dataset(n=16, labels=True):
    from datasets import Dataset

    b = bert_batch(batch=n, seed=7)
    columns = {k: v.tolist() for k, v in b.items() if labels or k != "labels"}
    return Dataset.from_dict(columns)


def test_distillation_trainer_brings_the_student_to_the_teacher(tmp_path):
    model = tiny_bert()
    batch = bert_batch(seed=99)
    with torch.no_grad():
        dense = model(**batch, output_hidden_states=True)
    peft_model = get_peft_model(
        model,
        RoutedFFNConfig(num_experts=4, top_k=1, router="top_k", importance=random_scores(model), task_type="SEQ_CLS"),
    )

    def gap():
        peft_model.eval()
        with torch.no_grad():
            out = peft_model(**batch, output_hidden_states=True)
        return hidden_state_loss(out, dense, batch["attention_mask"]).item()

    before = gap()
    _trainer(peft_model, tmp_path, 30, _dataset(labels=False)).train()  # distillation alone
    after = gap()
    print("gap", before, after)
    assert after < 0.5 * before, (before, after)
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**batch).logits, dense.logits)  # the teacher did not move


def test_teacher_forward_keeps_the_students_routing_under_checkpointing(tmp_path):
    """The teacher runs first, so a checkpointed stochastic router recomputes with the student's routing state: the
    gradients match those without checkpointing, and the auxiliary losses are scaled like the loss."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert(dropout=0.1)
        peft_model = get_peft_model(
            model,
            RoutedFFNConfig(
                router="moesart", top_k=2, trimmed_lasso_coef=0.1, importance=random_scores(model), task_type="SEQ_CLS"
            ),
        )
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = _trainer(peft_model, tmp_path, 1, _dataset(4))
        peft_model.train()
        inputs = {k: v for k, v in bert_batch().items()}
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "auxiliary losses were not part of the loss" would fail here
            loss = trainer.compute_loss(peft_model, inputs)
            assert len(hf_condroute.last_step(peft_model).records) == 2  # the student's decisions, not the teacher's
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
