"""The routed-adapter tuner behaves like a PEFT tuner: injection, training, saving, adapters, checkpointing,
generation, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import hf_condroute
from hf_condroute import ROUTERS, RoutedAdapterConfig
from hf_condroute.tuners.routed_adapter import RoutedAdapterLayer

from .conftest import bert_batch, make_bert, make_t5, t5_batch, top_k_for


def routed(model, **kw):
    kw.setdefault("num_experts", 4)
    kw.setdefault("adapter_dim", 8)
    return get_peft_model(model, RoutedAdapterConfig(**kw))


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedAdapterLayer)}


def test_default_targets_t5_and_bert():
    t5 = routed(make_t5(num_layers=6, num_decoder_layers=6), task_type="SEQ_2_SEQ_LM")
    names = list(layers(t5))
    assert len(names) == 24  # T5-small's layout: 6 + 6 layers, after self-attention and after the FFN
    assert not any("EncDecAttention" in n for n in names)
    assert sum(n.endswith("SelfAttention.o") for n in names) == 12
    bert = routed(make_bert(), task_type="SEQ_CLS")
    bnames = list(layers(bert))
    assert len(bnames) == 4 and sum(n.endswith("attention.output.dense") for n in bnames) == 2


def test_decoder_blocks_route_on_encoder_output():
    model = routed(make_t5(d_ff=48), task_type="SEQ_2_SEQ_LM")
    for name, layer in layers(model).items():
        router = layer.routed_adapter_block["default"].router
        side = "decoder" if ".decoder." in f".{name}" or name.startswith("decoder") else "encoder"
        assert layer.side == side or name.startswith("base_model.model.decoder") == (layer.side == "decoder")
        # routers read d_model features: the encoder output for decoder blocks, their own input otherwise
        assert router.in_features == 32


def test_only_adapter_and_router_parameters_train():
    model = routed(make_bert(), router="reinforce", task_type="SEQ_CLS")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("routed_adapter_block" in n or "classifier" in n for n in trainable)
    assert any(".router." in n for n in trainable) and any(".baseline." in n for n in trainable)


def test_untrained_adapter_changes_nothing():
    base = make_t5()
    batch = t5_batch()
    with torch.no_grad():
        expected = base(**batch).logits
    model = routed(base, router="top_k").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_trains_t5(router):
    model = routed(make_t5(), router=router, top_k=top_k_for(router), init_weights=False, task_type="SEQ_2_SEQ_LM")
    model.train()
    batch = t5_batch()
    out = model(**batch, routing_tags=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    adapter_grad = sum(g.abs().sum() for n, g in grads.items() if "experts" in n)
    router_grad = sum(g.abs().sum() for n, g in grads.items() if ".router." in n)
    assert adapter_grad > 0
    cls = hf_condroute.routers.router_class(router)
    assert (router_grad > 0) == cls.learned
    routing = hf_condroute.get_routing(model)
    assert len(routing) == 8
    # dense learned routers (softmax, smear) name every expert; heuristic ones one
    k = top_k_for(router) if cls.uses_top_k else (4 if cls.learned else 1)
    decision = next(iter(routing.values()))
    if cls.variable_width:
        assert decision.experts.shape[0] == 4 and decision.experts.shape[1] <= 4
    else:
        assert decision.experts.shape == (4, k)
    assert decision.probs.shape[0] == 4


def test_stochastic_routers_are_deterministic_in_eval_mode():
    model = routed(make_t5(), router="reinforce", init_weights=False).eval()
    batch = t5_batch()
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    torch.testing.assert_close(a, b)


def test_bert_classifier_with_token_routing():
    model = routed(make_bert(), router="top_k", routing_granularity="token", top_k=2, task_type="SEQ_CLS").train()
    batch = bert_batch()
    model(**batch).loss.backward()
    decision = hf_condroute.get_routing(model)["bert.encoder.layer.0.output.dense"]
    assert decision.experts.shape == (4, 7, 2)
    assert (decision.experts[1, 4:] == -1).all()  # padding tokens are not routed


def test_outputs_loss_adds_weighted_auxiliary_losses_in_training_only():
    base = make_t5()
    model = routed(base, router="top_k", router_z_loss_coef=0.5, init_weights=False, task_type="SEQ_2_SEQ_LM")
    batch = t5_batch()
    model.train()
    torch.manual_seed(0)
    total = model(**batch).loss
    aux = hf_condroute.get_routing_losses(model)
    assert set(aux) == {"z_loss"} and aux["z_loss"] > 0
    with model.disable_adapter():
        pass
    model.eval()
    task_only = model(**batch).loss
    assert task_only.item() != pytest.approx(total.item())
    assert total.item() > aux["z_loss"].item()


def test_save_and_load_in_a_fresh_process(tmp_path):
    model = routed(make_t5(), router="hash", init_weights=False, task_type="SEQ_2_SEQ_LM")
    model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    model_keys = {
        k.replace(".routed_adapter_block.default.", ".routed_adapter_block.")
        for k in model.state_dict()
        if "routed_adapter_block" in k
    }
    assert set(saved) == model_keys  # parameters and BatchNorm statistics, nothing missing
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, RoutedAdapterConfig) and config.router == "hash"
    batch = t5_batch()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    state = {k: v for k, v in model.state_dict().items() if "routed_adapter_block" in k}
    torch.save({"batch": batch, "expected": expected, "state": state}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, hf_condroute
        from peft import PeftModel
        from tests.conftest import make_t5
        torch.set_num_threads({torch.get_num_threads()})  # the parent's thread count: the same reduction order
        data = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(make_t5(), {str(tmp_path / "adapter")!r}).eval()
        state = model.state_dict()
        for key, value in data["state"].items():
            assert torch.equal(state[key], value), key
        with torch.no_grad():
            got = model(**data["batch"]).logits
        torch.testing.assert_close(got, data["expected"], rtol=0, atol=0)
        print("EXACT")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert "EXACT" in result.stdout, result.stderr[-3000:]


def test_loading_weights_that_do_not_fit_the_config_is_refused(tmp_path):
    model = routed(make_t5(), router="top_k")
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_experts"] = 6
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not fit the model built from its config.*num_experts=6"):
        PeftModel.from_pretrained(make_t5(), tmp_path)


def test_loading_into_a_base_of_another_hidden_size_names_the_base(tmp_path):
    routed(make_t5(), router="top_k").save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"do not fit this base model.*comes from the base model.*Load it into the base"
    ):
        PeftModel.from_pretrained(make_t5(d_model=48), tmp_path)


def test_a_target_module_that_is_not_there_lists_the_models_names():
    with pytest.raises(ValueError, match=r"not found in the base model.*module names end in: .*SelfAttention.*wo"):
        get_peft_model(make_t5(), RoutedAdapterConfig(num_experts=2, adapter_dim=4, target_modules=["SelfAtention"]))


def test_several_adapters(tmp_path):
    model = routed(make_t5(), router="tag", init_weights=False, task_type="SEQ_2_SEQ_LM")
    model.add_adapter("other", RoutedAdapterConfig(num_experts=2, adapter_dim=4, router="top_k", init_weights=False))
    batch = t5_batch()
    tags = torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        first = model(**batch, routing_tags=tags).logits
        model.set_adapter("other")
        second = model(**batch).logits  # no tags needed by the top-k adapter
    assert not torch.allclose(first, second)
    decision = next(iter(hf_condroute.get_routing(model).values()))
    assert decision.probs.shape == (4, 2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    model.delete_adapter("default")
    assert all("default" not in layer.routed_adapter_block for layer in layers(model).values())
    # a saved adapter loads under another name
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "other", adapter_name="copy")
    model.set_adapter("copy")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, second)


def test_disable_adapter_equals_base_and_unload_restores_it():
    base = make_t5()
    batch = t5_batch()
    with torch.no_grad():
        expected = base(**batch).logits
    model = routed(base, router="top_k", init_weights=False).eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, expected)
    unloaded = model.unload()
    assert not layers(unloaded)
    assert "forward" not in unloaded.__dict__ and "_condroute_state" not in unloaded.__dict__
    assert not unloaded._forward_pre_hooks and not unloaded.encoder._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch).logits, expected)


def test_merging_is_refused_with_a_clear_message():
    model = routed(make_t5(), router="top_k")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.base_model.merge_adapter()


@pytest.mark.parametrize("router", ["top_k", "reinforce", "moesart"])
def test_gradient_checkpointing_gives_the_same_gradients(router):
    grads = []
    for reentrant in (None, False, True):
        base = make_t5()
        if reentrant is not None:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = routed(
            base,
            router=router,
            top_k=top_k_for(router),
            init_weights=False,
            router_z_loss_coef=0.1,
            task_type="SEQ_2_SEQ_LM",
        )
        model.train()
        torch.manual_seed(7)
        model(**t5_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert set(other) == set(grads[0])
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_generate_with_beam_search_and_tags():
    model = routed(make_t5(), router="tag", init_weights=False, task_type="SEQ_2_SEQ_LM").eval()
    batch = t5_batch(batch=2)
    tags = torch.tensor([2, 0])
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        routing_tags=tags,
        num_beams=2,
        max_new_tokens=4,
        do_sample=False,
    )
    assert out.shape[0] == 2
    # decoder blocks saw one row per beam, each with its example's tag
    decoder = [d for n, d in hf_condroute.get_routing(model).items() if n.startswith("decoder")]
    assert decoder and decoder[0].experts.squeeze(1).tolist() == [2, 2, 0, 0]
    # greedy output equals the output of the model fed the same routing explicitly
    greedy = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        routing_tags=tags,
        max_new_tokens=4,
        do_sample=False,
    )
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            routing_tags=tags,
            decoder_input_ids=greedy[:, :-1],
        ).logits
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])


def test_hash_routing_is_stable_across_calls_and_padding():
    model = routed(make_t5(), router="hash", init_weights=False).eval()
    batch = t5_batch()
    model(**batch)
    first = {n: d.experts.clone() for n, d in hf_condroute.get_routing(model).items()}
    model(**{k: v[[1, 0, 2, 3]] for k, v in batch.items()})
    second = hf_condroute.get_routing(model)
    for name, experts in first.items():
        assert torch.equal(second[name].experts, experts[[1, 0, 2, 3]])


# ----- errors ---------------------------------------------------------------------------------------
def test_tag_router_without_tags_is_an_error():
    model = routed(make_bert(), router="tag", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="needs `routing_tags`"):
        model(**bert_batch())


def test_tag_out_of_range_and_wrong_shape():
    model = routed(make_bert(), router="tag", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"out of range.*\[9\]"):
        model(**bert_batch(), routing_tags=torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match=r"\(batch,\) or \(batch, groups\)"):
        model(**bert_batch(), routing_tags=torch.zeros(4, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="routing_tags has 3 rows but the batch has 4 examples"):
        model(**bert_batch(), routing_tags=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(router="topk"), r"Unknown router 'topk'\. Valid routers: tag, hash, monolithic, top_k"),
        (dict(top_k=9), "top_k=9 is larger than num_experts=4"),
        (dict(router="moesart", top_k=1), "needs top_k >= 2"),
        (dict(adapter_dim=0), "adapter_dim must be >= 1"),
        (dict(adapter_activation="swish2"), "Unknown activation"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutedAdapterConfig(num_experts=4, **kwargs)


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match="wrap nn.Linear"):
        routed(make_t5(), target_modules=["layer_norm"])


def test_single_example_training_batch_is_explained():
    model = routed(make_bert(), router="top_k", task_type="SEQ_CLS").train()
    batch = {k: v[:1] for k, v in bert_batch().items()}
    with pytest.raises(ValueError, match="BatchNorm needs at least 2"):
        model(**batch)


def test_any_model_with_linear_targets():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(5, 6), torch.nn.Linear(6, 2)

        def forward(self, x, labels=None):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = get_peft_model(
        MLP(), RoutedAdapterConfig(num_experts=3, adapter_dim=2, target_modules=["fc1"], init_weights=False)
    )
    model.train()
    out = model(torch.randn(4, 5))
    out.sum().backward()
    decision = hf_condroute.get_routing(model)["fc1"]
    assert decision.experts.shape == (4, 1)


def test_causal_lm_token_routing_and_generation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    with pytest.warns(UserWarning, match="causal language model"):
        routed(LlamaForCausalLM(config), router="top_k")
    model = routed(LlamaForCausalLM(config), router="hash", routing_granularity="token", task_type="CAUSAL_LM")
    ids = torch.randint(2, 50, (2, 5))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_beams=2)
    assert out.shape == (2, 8)
    # token hash routing: with the cache, each step routes only its new token, on that token's id
    last = hf_condroute.get_routing(model)["model.layers.0.mlp.down_proj"]
    assert last.experts.shape[1] == 1
