"""`to_native`: every exportable router x target loads in a fresh process that never imports hf_condroute (with
AutoModelForCausalLM), and computes what the routed model computes in evaluation mode: fp32 logits within 1e-5,
the same experts per token (from `output_router_logits`), the same greedy tokens; a bf16 export too. Per-expert LoRAs
load with plain PEFT. One subprocess probes every export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_condroute

from .conftest import make_llama
from .export_helpers import (
    PROMPT,
    make_mistral,
    make_qwen2,
    native_experts,
    reference,
    routed_ffn,
    routed_lora,
    routed_t5,
)

PROBE = Path(__file__).with_name("export_native_probe.py")
IDS = torch.tensor([[3, 17, 5, 30, 8, 41, 2, 19], [11, 4, 27, 9, 33, 6, 45, 12]])

# name -> (routed model builder, expected native class)
CAUSAL_CASES = {
    "ffn_top_k_renormalised": (lambda: routed_ffn(), "MixtralForCausalLM"),
    "ffn_top_k_probabilities": (lambda: routed_ffn(norm_topk_prob=False), "Qwen2MoeForCausalLM"),
    "ffn_top_1": (lambda: routed_ffn(top_k=1), "Qwen2MoeForCausalLM"),
    "ffn_shared_neurons": (lambda: routed_ffn(shared_neurons=8, expert_dim=20), "Qwen2MoeForCausalLM"),
    "ffn_dense_layers": (lambda: routed_ffn(target_modules=["model.layers.1.mlp"]), "Qwen2MoeForCausalLM"),
    "ffn_qwen2": (lambda: routed_ffn(make_qwen2()), "Qwen2MoeForCausalLM"),
    "ffn_mistral_sliding_window": (lambda: routed_ffn(make_mistral()), "MixtralForCausalLM"),
    "ffn_tied_embeddings": (lambda: routed_ffn(make_llama(tie_word_embeddings=True)), "MixtralForCausalLM"),
    "ffn_st_gumbel": (lambda: routed_ffn(router="st_gumbel", top_k=1), "MixtralForCausalLM"),
    "ffn_reinforce": (lambda: routed_ffn(router="reinforce", top_k=1), "MixtralForCausalLM"),
    "ffn_softmax": (lambda: routed_ffn(router="softmax"), "MixtralForCausalLM"),
    "ffn_smoe_v_moe": (lambda: routed_ffn(router="smoe", router_jitter_noise=0.1), "MixtralForCausalLM"),
    "ffn_temperature_permutation": (
        lambda: _permuted(routed_ffn(router="v_moe", router_temperature=0.5, expert_permutation=True)),
        "MixtralForCausalLM",
    ),
    "ffn_zero_router_bias": (lambda: routed_ffn(router_bias=True), "MixtralForCausalLM"),
    "lora_st_gumbel": (lambda: routed_lora(), "MixtralForCausalLM"),
    "lora_reinforce_down_up": (
        lambda: routed_lora(router="reinforce", target_modules=["up_proj", "down_proj"]),
        "MixtralForCausalLM",
    ),
    "lora_monolithic_attention": (
        lambda: routed_lora(router="monolithic", target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
        "MixtralForCausalLM",
    ),
}


# name -> (routed T5 builder, the routed layers among encoder 0, 1 and decoder 0, 1): every Switch layer is sparse
SWITCH_CASES = {
    "switch_top_1": (lambda: routed_t5(), [0, 1, 2, 3]),
    "switch_batchnorm_router": (lambda: routed_t5(batchnorm=True), [0, 1, 2, 3]),
    "switch_dense_layers": (
        lambda: routed_t5(
            target_modules=["encoder.block.0.layer.1.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense"]
        ),
        [0, 3],
    ),
}

# what the chosen target must say for the case to mean what its name says
EXPECTED_CONFIG = {
    "ffn_top_k_probabilities": {"norm_topk_prob": False, "shared_expert_intermediate_size": 16},
    "ffn_shared_neurons": {"shared_expert_intermediate_size": 8, "moe_intermediate_size": 12, "norm_topk_prob": True},
    "ffn_dense_layers": {"mlp_only_layers": [0], "intermediate_size": 64},
    "ffn_qwen2": {"qkv_bias": True},
    "ffn_softmax": {"num_experts_per_tok": 4},
    "ffn_mistral_sliding_window": {"sliding_window": 4},
    "ffn_tied_embeddings": {"tie_word_embeddings": True},
    "lora_st_gumbel": {"intermediate_size": 64, "num_local_experts": 3},
    "lora_monolithic_attention": {"num_local_experts": 1},
}


def _permuted(model):
    for module in model.modules():
        if hasattr(module, "expert_map"):
            module.expert_map.copy_(torch.tensor([2, 0, 3, 1]))
    return model


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Build, export and reference every case, then run the probe once over all of them."""
    root = tmp_path_factory.mktemp("exports")
    cases, refs = [], {}
    for name, (build, _) in CAUSAL_CASES.items():
        model = build()
        folder = root / name
        hf_condroute.save_native(model, str(folder))
        refs[name] = reference(model, {"input_ids": IDS}, {"input_ids": PROMPT})
        refs[name]["top_k"] = json.loads((folder / "config.json").read_text())["num_experts_per_tok"]
        torch.save({"forward": {"input_ids": IDS}, "generate": {"input_ids": PROMPT}}, folder / "inputs.pt")
        cases.append({"dir": str(folder), "kind": "causal", "inputs": str(folder / "inputs.pt")})
        if name == "ffn_top_k_renormalised":  # the same model exported in bfloat16
            hf_condroute.save_native(model, str(root / "bf16"), dtype=torch.bfloat16)
            refs["bf16"] = refs[name]
            cases.append({"dir": str(root / "bf16"), "kind": "causal", "inputs": str(folder / "inputs.pt")})
    for name, (build, _) in SWITCH_CASES.items():
        model = build()
        folder = root / name
        hf_condroute.save_native(model, str(folder))
        forward = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
        refs[name] = reference(model, forward, {"input_ids": IDS})
        torch.save({"forward": forward, "generate": {"input_ids": IDS}}, folder / "inputs.pt")
        cases.append({"dir": str(folder), "kind": "seq2seq", "inputs": str(folder / "inputs.pt")})
    # per-expert LoRAs of a tag-routed LoRA: expert i alone = the routed model with tag i
    base = make_llama()
    base.save_pretrained(root / "lora_base")
    model = routed_lora(base, router="tag", routing_granularity="example", target_modules=["q_proj", "down_proj"])
    folders = hf_condroute.save_expert_loras(model, str(root / "loras"))
    with torch.no_grad():
        refs["loras"] = [model(input_ids=IDS, routing_tags=torch.full((2,), i)).logits for i in range(len(folders))]
    torch.save({"input_ids": IDS}, root / "lora_inputs.pt")
    cases.append(
        {
            "dir": str(root / "loras"),
            "kind": "lora",
            "base": str(root / "lora_base"),
            "adapters": folders,
            "inputs": str(root / "lora_inputs.pt"),
        }
    )
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(PROBE), str(manifest)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, refs


@pytest.mark.parametrize("name", list(CAUSAL_CASES))
def test_native_export_matches_the_routed_model(probed, name):
    root, refs = probed
    ref, got = refs[name], torch.load(root / name / "probe.pt")
    assert got["class"] == CAUSAL_CASES[name][1]
    config = json.loads((root / name / "config.json").read_text())
    assert {k: config[k] for k in EXPECTED_CONFIG.get(name, {})} == EXPECTED_CONFIG.get(name, {})
    assert got["dtype"] == "torch.float32"
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)  # same kernels up to summation order
    experts = native_experts(got["router_logits"], ref["top_k"])
    assert len(experts) == len(ref["experts"])
    for native, routed in zip(experts, ref["experts"]):
        assert torch.equal(native, routed)
    assert torch.equal(got["generated"], ref["generated"])


@pytest.mark.parametrize("name", list(SWITCH_CASES))
def test_switch_export_matches_the_routed_t5(probed, name):
    root, refs = probed
    ref, got = refs[name], torch.load(root / name / "probe.pt")
    assert got["class"] == "SwitchTransformersForConditionalGeneration"
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)
    experts = native_experts(got["router_logits"], 1)
    assert len(experts) == 4  # every Switch layer is sparse; a dense one sends every token to expert 0
    routed = SWITCH_CASES[name][1]
    for i, layer in enumerate(experts):
        if i in routed:
            assert torch.equal(layer, ref["experts"][routed.index(i)])
        else:
            assert bool((layer == 0).all())
    assert torch.equal(got["generated"], ref["generated"])


def test_bfloat16_export(probed):
    root, refs = probed
    got = torch.load(root / "bf16" / "probe.pt")
    assert got["dtype"] == "torch.bfloat16"
    # bfloat16 keeps 8 bits of mantissa: logits of this tiny model (|x| < 2) agree to a few hundredths
    torch.testing.assert_close(got["logits"], refs["bf16"]["logits"], atol=5e-2, rtol=0)
    experts = native_experts(got["router_logits"], 2)
    agree = torch.cat([(a == b).all(-1) for a, b in zip(experts, refs["bf16"]["experts"])]).float().mean()
    assert agree > 0.9  # a bf16 router may flip a near-tie; the fp32 export above matches every token


def test_expert_loras_load_with_plain_peft(probed):
    root, refs = probed
    got = torch.load(root / "loras" / "probe.pt")
    for i, expected in enumerate(refs["loras"]):
        torch.testing.assert_close(got[f"logits_{i}"], expected, atol=1e-5, rtol=0)
    record = json.loads((root / "loras" / "experts.json").read_text())
    assert record["adapters"] == ["expert_0", "expert_1", "expert_2"]
    assert record["tag_to_adapter"] == {"0": "expert_0", "1": "expert_1", "2": "expert_2"}


def test_card_says_what_the_export_was_made_from(probed):
    root, _ = probed
    card = (root / "ffn_top_k_renormalised" / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "MixtralForCausalLM exported from a routed FFN" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert "| Router | `top_k` |" in card
    assert (root / "ffn_top_k_renormalised" / "routing_stats.json").is_file()


def test_mixtral_is_refused_where_it_is_not_exact():
    model = routed_ffn(make_llama(), norm_topk_prob=False)
    with pytest.raises(hf_condroute.ExportError, match="not renormalised.*Use target='qwen2_moe'"):
        hf_condroute.to_native(model, target="mixtral")
