"""What a forward accepts: routing tags and keys with one row per example (never silently repeated), and hash keys
for per-token routing on `inputs_embeds`."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import hf_condroute
from hf_condroute import RoutedAdapterConfig

from .conftest import bert_batch, llama_batch, make_bert, make_llama, make_t5, t5_batch


def routed(model, **kw):
    return get_peft_model(model, RoutedAdapterConfig(num_experts=4, adapter_dim=8, init_weights=False, **kw))


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_tags_with_the_wrong_number_of_rows_are_refused(family, rows):
    model = routed(make_bert() if family == "bert" else make_t5(), router="tag")
    batch = bert_batch(batch=6) if family == "bert" else t5_batch(batch=6)
    with pytest.raises(ValueError, match=rf"routing_tags has {rows} rows but the batch has 6 examples"):
        model(**batch, routing_tags=torch.arange(rows) % 4)


def test_generate_refuses_short_tags_and_repeats_full_ones_for_beams():
    model = routed(make_t5(), router="tag", task_type="SEQ_2_SEQ_LM").eval()
    batch = t5_batch(batch=4)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3)
    with pytest.raises(ValueError, match="routing_tags has 2 rows but the batch has 4 examples"):
        model.generate(**inputs, routing_tags=torch.tensor([0, 1]), num_beams=2)
    model.generate(**inputs, routing_tags=torch.tensor([0, 1, 2, 3]), num_beams=2)
    decoder = [d for n, d in hf_condroute.get_routing(model).items() if n.startswith("decoder")]
    assert decoder[0].experts.squeeze(1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_keys_and_scalar_tags_are_checked_too():
    model = routed(make_bert(), router="hash")
    with pytest.raises(ValueError, match="routing_keys has 2 rows but the batch has 4 examples"):
        model(**bert_batch(), routing_keys=torch.tensor([5, 6]))
    tagged = routed(make_bert(), router="tag")
    with pytest.raises(ValueError, match="routing_tags is a single number"):
        tagged(**bert_batch(), routing_tags=torch.tensor(1))


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_tags_given_per_token_are_refused_and_tag_groups_are_read(family):
    model = routed(make_bert() if family == "bert" else make_t5(), router="tag")
    batch = bert_batch() if family == "bert" else t5_batch()
    length = batch["input_ids"].shape[1]
    per_token = torch.zeros(4, length, dtype=torch.long)  # (batch, sequence length): a tag per token, by mistake
    with pytest.raises(ValueError, match=rf"shape \(4, {length}\), one column per token.*tags are per example"):
        model(**batch, routing_tags=per_token)
    groups = torch.stack([torch.arange(4) % 4, torch.full((4,), 3)], 1)  # (batch, groups): blocks read column 0
    model(**batch, routing_tags=groups)
    assert all(d.experts[:, 0].tolist() == [0, 1, 2, 3] for d in hf_condroute.get_routing(model).values())


def per_token_hash_llama():
    return routed(make_llama(), router="hash", routing_granularity="token", task_type="CAUSAL_LM").eval()


def test_per_token_hash_on_inputs_embeds_takes_per_token_keys():
    model = per_token_hash_llama()
    batch = llama_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask).logits
        expected = {k: d.experts.clone() for k, d in hf_condroute.get_routing(model).items()}
        embeds = model.get_input_embeddings()(ids)
        with pytest.raises(ValueError, match=r"routing_keys=.*\(batch, tokens\) for per-token routing"):
            model(inputs_embeds=embeds, attention_mask=mask)
        # the advice of that error works: the token ids as keys route exactly as input_ids did
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, routing_keys=ids).logits
    got = hf_condroute.get_routing(model)
    for name, experts in expected.items():
        assert torch.equal(got[name].experts, experts), name
    torch.testing.assert_close(from_embeds, from_ids)
    # other keys route differently (keys are really used, not ignored)
    with torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=mask, routing_keys=ids + 1)
    assert any(not torch.equal(d.experts, expected[n]) for n, d in hf_condroute.get_routing(model).items())


def test_keys_of_the_wrong_shape_for_the_granularity_are_refused():
    model = per_token_hash_llama()
    batch = llama_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    with pytest.raises(ValueError, match=r"per-token routing needs one key per token, shape \(batch, 7\)"):
        model(inputs_embeds=embeds, routing_keys=torch.arange(4))
    with pytest.raises(ValueError, match=r"per-token routing needs one key per token, shape \(batch, 7\)"):
        model(inputs_embeds=embeds, routing_keys=batch["input_ids"][:, :5])
    per_example = routed(make_bert(), router="hash")
    with pytest.raises(ValueError, match=r"routes per example: give one key per example, shape \(batch,\)"):
        per_example(**bert_batch(), routing_keys=torch.zeros(4, 7, dtype=torch.long))


def test_a_forward_whose_first_parameter_is_not_named_self_takes_positional_inputs():
    """The routing hook binds positional inputs by the forward's signature, whatever its first parameter's name."""

    class Net(torch.nn.Module):
        def __init__(this):
            super().__init__()
            this.proj = torch.nn.Linear(8, 8)

        def forward(this, x):
            return this.proj(x)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 5, 8)
    config = RoutedAdapterConfig(num_experts=4, adapter_dim=4, target_modules=["proj"], routing_granularity="token")
    want = net.proj(x)
    model = get_peft_model(net, config)  # zero-initialised experts: the base's output
    torch.testing.assert_close(model(x), want)
    assert hf_condroute.get_routing(model)["proj"].experts.shape[:2] == (3, 5)  # every token routed
