"""Every routed model with no exact native form gets one `ExportError` naming what blocks it and what to train with
instead (issue 26, item 6); the command line exports a saved adapter; the card carries the routing statistics."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

import hf_condroute
from hf_condroute import RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig
from hf_condroute.export.__main__ import main
from hf_condroute.export.checks import REFUSED_ROUTERS
from hf_condroute.routers import router_class

from .conftest import make_bert, make_llama, make_t5
from .export_helpers import MLP_SHARING, routed_ffn, routed_lora, routed_t5

ExportError = hf_condroute.ExportError


def refused(model, *fragments: str, target: str | None = None) -> str:
    with pytest.raises(ExportError) as info:
        hf_condroute.to_native(model, target=target)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("router", sorted(REFUSED_ROUTERS))
def test_routers_without_a_native_form(router):
    granularity = "example" if router_class(router).per_example_only else "token"
    model = routed_ffn(router=router, routing_granularity=granularity)
    message = refused(model, f"router {router!r}", REFUSED_ROUTERS[router][0], "Train with")
    assert message.startswith(f"Cannot export router {router!r} to a native transformers model")


@pytest.mark.parametrize("router", ["st_gumbel", "reinforce", "moesart"])
def test_equal_weights_of_several_experts(router):
    refused(routed_ffn(router=router, top_k=2), "weights each of its 2 experts equally", "top_k=1")


def test_per_example_routing():
    refused(routed_ffn(routing_granularity="example"), "per-example routing", "routing_granularity='token'")


def test_capacity_limit():
    refused(routed_ffn(expert_capacity_factor=1.0), "expert_capacity_factor=1.0", "expert_capacity_factor=None")


def test_batchnorm_router_folds_into_a_bias_mixtral_cannot_hold():
    model = routed_ffn(router_batchnorm=True).train()
    with torch.no_grad():  # running statistics of real hidden states: the folded bias differs per expert
        model(input_ids=torch.randint(1, 50, (4, 8)))
    refused(model.eval(), "router_batchnorm=True", "a Linear without bias", "router_bias=False")


def test_trained_router_bias():
    model = routed_ffn(router_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.network.proj.bias"):
                p.normal_()
    refused(model, "router_bias=True: its router Linear has a trained bias", "router_bias=False")


def test_routed_lora_with_weights_inside_the_projections():
    model = routed_lora(router="top_k", top_k=2, norm_topk_prob=True)
    refused(model, "mixes its experts inside each projection", "top_k=1")


def test_routed_lora_projections_routing_independently():
    refused(routed_lora(router_sharing=None), "route independently", "router_sharing")


def test_routed_lora_router_reading_down_proj():
    refused(routed_lora(target_modules=["down_proj"]), "reads down_proj's input")


def test_routed_attention():
    model = routed_lora(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], router_sharing=MLP_SHARING)
    refused(model, "routed attention has no native form")


def test_adapter_experts():
    model = get_peft_model(make_llama(), RoutedAdapterConfig(num_experts=2, adapter_dim=4, routing_granularity="token"))
    refused(model, "bottleneck or conv adapter experts", "RoutedFFNConfig")


def test_architecture_outside_the_llama_family():
    model = get_peft_model(make_bert(), RoutedFFNConfig(num_experts=2, top_k=1, init_weights=False))
    refused(model, "Llama-family")


def test_llama_attention_biases():
    refused(routed_ffn(make_llama(attention_bias=True)), "attention_bias=True")


@pytest.mark.parametrize("overrides", [dict(top_k=2), dict(router="st_gumbel")], ids=["top_2", "st_gumbel"])
def test_switch_needs_top_1_probability_weighting(overrides):
    refused(routed_t5(**overrides), "Switch routes each token to one expert", "top_k=1")


def test_switch_needs_a_non_gated_t5():
    base = make_t5(feed_forward_proj="gated-gelu")
    model = get_peft_model(base, RoutedFFNConfig(num_experts=2, top_k=1, init_weights=False))
    refused(model, "with a gated FFN", "non-gated")


def test_routed_lora_on_t5():
    config = RoutedLoraConfig(num_experts=2, router="st_gumbel", target_modules=["wi", "wo"], r=2)
    refused(get_peft_model(make_t5(), config), "a routed LoRA on an encoder-decoder", "RoutedFFNConfig")


def test_unknown_target():
    with pytest.raises(ExportError, match="target must be one of"):
        hf_condroute.to_native(routed_ffn(), target="deepseek")


def test_expert_loras_need_a_routed_lora():
    with pytest.raises(ExportError, match="RoutedLoraConfig"):
        hf_condroute.save_expert_loras(routed_ffn(), "unused")


def test_expert_loras_refuse_per_block_tag_maps(tmp_path):
    model = routed_lora(router="tag", routing_granularity="example", tag_to_expert_pattern={"layers\\.0": [1, 0, 2]})
    with pytest.raises(ExportError, match="tag_to_expert_pattern"):
        hf_condroute.save_expert_loras(model, str(tmp_path))


def test_command_line_exports_a_saved_adapter(tmp_path):
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    model = routed_ffn(base)
    model.save_pretrained(tmp_path / "adapter")
    main([str(tmp_path / "adapter"), "--out", str(tmp_path / "native"), "--base", str(tmp_path / "base")])
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert "hf_condroute" not in json.dumps(config)
    assert "MixtralForCausalLM exported from a routed FFN" in (tmp_path / "native" / "README.md").read_text()


def test_command_line_writes_expert_loras(tmp_path):
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    routed_lora(base).save_pretrained(tmp_path / "adapter")
    main(
        [
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "loras"),
            "--base",
            str(tmp_path / "base"),
            "--expert-loras",
        ]
    )
    record = json.loads((tmp_path / "loras" / "experts.json").read_text())
    assert record["adapters"] == ["expert_0", "expert_1", "expert_2"]
    assert json.loads((tmp_path / "loras" / "expert_2" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_native_card_carries_the_routing_statistics(tmp_path):
    model = routed_ffn()
    hf_condroute.compute_routing_stats(model, [{"input_ids": torch.randint(1, 50, (2, 8))} for _ in range(2)])
    hf_condroute.save_native(model, str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "### Routing statistics (of the routed model)" in card
    assert "Measured on the **eval** data" in card
    assert "model.layers.0.mlp" in card or "layers.0.mlp" in card
    assert (tmp_path / "routing_load.png").is_file()
    record = json.loads((tmp_path / "routing_stats.json").read_text())
    assert record["routing_config"]["router_bias"] is False


def test_shared_neurons_moved_apart_in_one_layer_stay_in_every_expert():
    """A shared expert needs the same copy in every expert of every layer (one expert width per model): here one copy
    of layer 1 moved, so no layer gets a shared expert, and the export is a Mixtral of full slices, still exact."""
    model = routed_ffn(shared_neurons=8, expert_dim=20)
    bank = model.base_model.model.model.layers[1].mlp.routed_ffn_block["default"].experts
    with torch.no_grad():
        bank.wi[0] += 0.01
    native = hf_condroute.to_native(model)
    assert type(native).__name__ == "MixtralForCausalLM" and native.config.intermediate_size == 20
    ids = torch.randint(1, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(native(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_command_line_refusal_is_one_message(tmp_path, capsys):
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    routed_ffn(base, routing_granularity="example").save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "adapter"), "--out", str(tmp_path / "native"), "--base", str(tmp_path / "base")])
    assert exit_info.value.code == 2
    assert "error: Cannot export per-example routing" in capsys.readouterr().err
