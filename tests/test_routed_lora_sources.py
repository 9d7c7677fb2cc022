"""Routed LoRA experts started from existing PEFT LoRAs (lora_experts), and the errors when one does not fit."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftConfig, PeftModel, get_peft_model

from hf_condroute import RoutedAdapterConfig, RoutedLoraConfig
from hf_condroute.tuners.routed_lora import RoutedLoraLayer

from .conftest import llama_batch, make_llama
from .routed_lora_helpers import PEFT_ROUNDING, layers, peft_lora, routed

TARGETS = ["q_proj", "v_proj", "down_proj"]


def saved_lora(path, seed: int, make=make_llama, **kw):
    kw.setdefault("target_modules", TARGETS)
    peft_lora(make(), seed=seed, **kw).save_pretrained(path)
    return str(path)


def test_one_lora_with_the_monolithic_router_equals_its_peft_output(tmp_path):
    path = saved_lora(tmp_path / "lora", seed=1)
    model = routed(
        make_llama(),
        router="monolithic",
        num_experts=None,
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        lora_experts=[path],
    ).eval()
    assert model.peft_config["default"].num_experts == 1  # defaults to the number of LoRAs
    reference = PeftModel.from_pretrained(make_llama(), path).eval()
    batch = llama_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **PEFT_ROUNDING)


@pytest.mark.parametrize("granularity", ["example", "token"])
def test_two_loras_with_the_tag_router_give_each_row_its_loras_output(tmp_path, granularity):
    paths = [saved_lora(tmp_path / f"lora{i}", seed=10 + i) for i in range(2)]
    config = RoutedLoraConfig(
        router="tag", r=8, lora_alpha=16, target_modules=TARGETS, routing_granularity=granularity, lora_experts=paths
    )
    assert config.num_experts == 2
    if granularity == "example":  # tag routing pools nothing, but the warning is about the granularity
        with pytest.warns(UserWarning, match="causal language model"):
            model = get_peft_model(make_llama(), config).eval()
    else:
        model = get_peft_model(make_llama(), config).eval()
    tags = torch.tensor([1, 0, 0, 1])
    batch = llama_batch()
    with torch.no_grad():
        got = model(**batch, routing_tags=tags).logits
        for i, path in enumerate(paths):
            expected = PeftModel.from_pretrained(make_llama(), path).eval()(**batch).logits
            rows = tags == i
            torch.testing.assert_close(got[rows], expected[rows], **PEFT_ROUNDING)


def test_experts_from_loras_train_save_and_load_without_the_sources(tmp_path):
    import shutil

    paths = [saved_lora(tmp_path / f"lora{i}", seed=20 + i, lora_alpha=32) for i in range(2)]
    # more experts than LoRAs: the others start as init_lora_weights says; another alpha rescales the copies' B
    model = routed(
        make_llama(),
        router="top_k",
        top_k=2,
        num_experts=3,
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        lora_experts=paths,
        task_type="CAUSAL_LM",
    )
    bank = layers(model)["base_model.model.model.layers.0.self_attn.q_proj"].bank("default")
    source = PeftModel.from_pretrained(make_llama(), paths[1]).base_model.model.model.layers[0].self_attn.q_proj
    # a copy scaled by a power of two: exact on any machine
    torch.testing.assert_close(bank.lora_B[1], source.lora_B["default"].weight.t() * 2, rtol=0, atol=0)
    assert torch.equal(bank.lora_B[2], torch.zeros_like(bank.lora_B[2]))
    model.train()
    model(**llama_batch()).loss.backward()
    model.save_pretrained(tmp_path / "routed")
    assert PeftConfig.from_pretrained(tmp_path / "routed").lora_experts is None
    for p in paths:
        shutil.rmtree(p)
    model.eval()
    with torch.no_grad():
        expected = model(**llama_batch()).logits
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "routed").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**llama_batch()).logits, expected, rtol=0, atol=0)


def test_lora_experts_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    good = saved_lora(tmp_path / "good", seed=1)

    def build(paths, **kw):
        kw.setdefault("target_modules", TARGETS)
        kw.setdefault("r", 8)
        kw.setdefault("router", "top_k")
        return routed(make_llama(), num_experts=None, lora_experts=paths, **kw)

    with pytest.raises(ValueError, match=r"lora_experts\[1\].*rank r=4, but this RoutedLoraConfig has r=8.*Set r=4"):
        build([good, saved_lora(tmp_path / "rank4", seed=2, r=4)])
    with pytest.raises(ValueError, match=r"lora_experts\[0\].*has no weights for model\.layers\.0\.mlp\.down_proj"):
        build([saved_lora(tmp_path / "qv", seed=3, target_modules=["q_proj", "v_proj"])])
    with pytest.raises(ValueError, match=r"adapts model\.layers\.0\.mlp\.up_proj.*which this config does not target"):
        build([saved_lora(tmp_path / "more", seed=4, target_modules=TARGETS + ["up_proj"])])
    wide = saved_lora(tmp_path / "wide", seed=5, make=lambda: make_llama(hidden_size=48))
    with pytest.raises(ValueError, match=r"does not fit this base model.*Use LoRAs trained on this base model"):
        build([wide])
    get_peft_model(
        make_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match=r"is a IA3 adapter, not a LoRA"):
        build([str(tmp_path / "ia3")])
    get_peft_model(
        make_llama(), RoutedAdapterConfig(num_experts=2, adapter_dim=4, routing_granularity="token")
    ).save_pretrained(tmp_path / "ra")
    with pytest.raises(ValueError, match=r"is a ROUTED_ADAPTER adapter, not a LoRA"):
        build([str(tmp_path / "ra")])
    with pytest.raises(ValueError, match=r"lora_experts\[0\].*is not a PEFT checkpoint"):
        build([str(tmp_path / "nothing-here")])
    with pytest.raises(ValueError, match=r"router='monolithic' has one expert per target, but lora_experts gives 2"):
        build([good, good], router="monolithic")
    with pytest.raises(ValueError, match=r"num_experts=1 but 2 lora_experts"):
        RoutedLoraConfig(num_experts=1, lora_experts=[good, good])
    untouched = make_llama()
    with pytest.raises(ValueError, match="rank r=4"):
        get_peft_model(untouched, RoutedLoraConfig(r=8, target_modules=TARGETS, lora_experts=[str(tmp_path / "rank4")]))
    assert not any(isinstance(m, RoutedLoraLayer) for m in untouched.modules())  # refused before any replacement
