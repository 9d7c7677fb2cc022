"""Routed tiny causal LMs for the export tests, and what they compute (the reference a native export must match)."""

from __future__ import annotations

import re

import torch
from peft import get_peft_model
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_condroute
from hf_condroute import RoutedFFNConfig, RoutedLoraConfig

from .conftest import make_llama, make_t5

EXPORT_READY = dict(routing_granularity="token", router_batchnorm=False, router_bias=False, router_init_std=1.0)
MLP_SHARING = r"layers\.\d+\.mlp"
PROMPT = torch.tensor([[3, 17, 5, 30, 8]])


def make_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """The tiny Llama's shape as a Qwen2 (whose attention has q/k/v biases)."""
    llama = make_llama(seed).config
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = Qwen2Config(**{k: getattr(llama, k) for k in (*shape, "num_key_value_heads", "pad_token_id")})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(std=0.5)
    return model


def make_mistral(seed: int = 0) -> MistralForCausalLM:
    """The tiny Llama's shape as a Mistral with a sliding window shorter than the test sequences."""
    llama = make_llama(seed).config
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    values = {k: getattr(llama, k) for k in (*shape, "num_key_value_heads", "pad_token_id")}
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**values, sliding_window=4)).eval()


def routed_ffn(base=None, seed: int = 0, **overrides):
    base = base if base is not None else make_llama()
    torch.manual_seed(seed)
    values = dict(EXPORT_READY, num_experts=4, top_k=2, init_weights=False)
    values.update(overrides)
    return get_peft_model(base, RoutedFFNConfig(**values)).eval()


def routed_lora(base=None, seed: int = 0, **overrides):
    base = base if base is not None else make_llama()
    torch.manual_seed(seed)
    values = dict(
        EXPORT_READY,
        num_experts=3,
        top_k=1,
        router="st_gumbel",
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        router_sharing=MLP_SHARING,
    )
    values.update(overrides)
    return get_peft_model(base, RoutedLoraConfig(**values)).eval()


def chosen_experts(peft_model) -> list[torch.Tensor]:
    """Per routed MLP (one block per MLP: shared routers repeat their owner's decision), the experts each token
    chose, sorted within the token."""
    seen, out = set(), []
    for name, decision in hf_condroute.get_routing(peft_model).items():
        if not re.search(r"\.mlp\b|DenseReluDense", name):
            continue  # a merged (monolithic) attention LoRA: no native router
        layer = re.sub(r"\.(gate_proj|up_proj|down_proj)$", "", name)  # a shared router's targets: one layer
        if layer not in seen:
            seen.add(layer)
            experts = decision.experts.reshape(-1, decision.experts.shape[-1])  # (batch, tokens, k) -> rows
            out.append(experts.sort(dim=-1).values)
    return out


def native_experts(router_logits: list[torch.Tensor], top_k: int) -> list[torch.Tensor]:
    rows = [t.float().reshape(-1, t.shape[-1]) for t in router_logits]
    return [t.softmax(-1).topk(top_k, dim=-1).indices.sort(dim=-1).values for t in rows]


def reference(peft_model, forward: dict, generate: dict) -> dict:
    """What the routed model computes in evaluation mode: logits, chosen experts, greedy tokens."""
    with torch.no_grad():
        logits = peft_model(**forward).logits
        experts = chosen_experts(peft_model)
        generated = peft_model.generate(**generate, do_sample=False, max_new_tokens=8)
    return {"logits": logits, "experts": experts, "generated": generated}


def routed_t5(seed: int = 0, batchnorm: bool = False, **overrides):
    """A T5 routed FFN, per token, top-1; with `batchnorm`, a router whose running statistics a few training batches
    have set (its evaluation form is a Linear with a bias)."""
    base = make_t5()
    torch.manual_seed(seed)
    values = dict(EXPORT_READY, num_experts=4, top_k=1, init_weights=False)
    values.update(router_batchnorm=batchnorm, router_bias=batchnorm, **overrides)
    model = get_peft_model(base, RoutedFFNConfig(**values))
    if batchnorm:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=torch.randint(2, 50, (4, 9)), decoder_input_ids=torch.randint(2, 50, (4, 5)))
    return model.eval()
