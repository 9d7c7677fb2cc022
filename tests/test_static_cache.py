"""Generation with every cache transformers offers (dynamic, static, sliding window), for every tuner: with a static
or sliding cache transformers hands the model a 4-D mask of its own, which the routing hook reads as the same
(batch, length) padding mask as the dynamic cache's 2-D one, so greedy decoding gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import MistralConfig, MistralForCausalLM

from hf_condroute import RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig
from hf_condroute.block.context import token_mask

from .conftest import llama_batch, llama_values, make_llama

TUNERS = {
    "lora_token": lambda: RoutedLoraConfig(num_experts=4, r=4, top_k=2, init_lora_weights=False),
    "adapter_example": lambda: RoutedAdapterConfig(
        num_experts=4, adapter_dim=4, routing_granularity="example", init_weights=False, task_type="CAUSAL_LM"
    ),
    "adapter_token": lambda: RoutedAdapterConfig(
        num_experts=4, adapter_dim=4, routing_granularity="token", init_weights=False, task_type="CAUSAL_LM"
    ),
    "ffn_token": lambda: RoutedFFNConfig(num_experts=4, top_k=2, init_weights=False, task_type="CAUSAL_LM"),
}


def make_mistral(seed: int = 0):
    """Sliding-window attention: with the static cache its layers get a sliding cache and a sliding 4-D mask."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**llama_values(sliding_window=6))).eval()


def generate(model, batch, **kw):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.filterwarnings("ignore:.*is a causal language model")
@pytest.mark.parametrize("tuner", sorted(TUNERS))
@pytest.mark.parametrize("base", ["llama", "mistral"])
def test_static_and_sliding_caches_decode_like_the_dynamic_cache(tuner, base):
    torch.manual_seed(0)
    model = get_peft_model(make_llama() if base == "llama" else make_mistral(), TUNERS[tuner]())
    batch = llama_batch()  # left padding: the prefill's 4-D mask has padding queries
    tokens, scores = generate(model, batch)
    caches = ["static"] if base == "mistral" else ["static", "sliding_window"]
    for cache in caches:
        other_tokens, other_scores = generate(model, batch, cache_implementation=cache)
        assert torch.equal(other_tokens, tokens), cache
        # the static cache attends over a longer, masked key buffer: the same values up to float rounding
        torch.testing.assert_close(other_scores, scores, rtol=1e-4, atol=1e-4)


def test_token_mask_reads_boolean_and_additive_4d_masks():
    padding = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    mask4 = (causal[None] & padding[:, None, :] & padding[:, :, None]).unsqueeze(1)  # (B, 1, Q, K)
    assert torch.equal(token_mask(mask4), padding)
    additive = torch.zeros(mask4.shape).masked_fill(~mask4, torch.finfo(torch.float32).min)
    assert torch.equal(token_mask(additive), padding)
    assert torch.equal(token_mask(additive.masked_fill(~mask4, float("-inf"))), padding)
    two_d = padding.long()
    assert token_mask(two_d) is two_d
    assert token_mask(None) is None
