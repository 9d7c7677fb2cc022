"""A T5 routed FFN as `SwitchTransformersForConditionalGeneration` (models/switch_transformers).

Switch routes each token with `SwitchTransformersTop1Router`: a Linear (with a bias when `router_bias`) in float32,
softmax, top-1, the expert output times its probability, and an expert capacity counted along each sequence (set
here to more tokens than any sequence has, so nothing is dropped). That is a routed FFN with per-token `top_k`
routing and top_k=1; a BatchNorm router folds into the bias. Its experts are T5's non-gated FFN, all of `d_ff`
neurons: slices narrower than a dense FFN left in the model are padded with zero neurons (act(0) = 0 adds nothing).

Every layer is sparse (`num_sparse_*_layers` = the number of layers; Switch cannot leave exactly the layers a user
chose dense): a layer left dense becomes one whose router sends every token to expert 0, the dense FFN, with
probability exactly 1 (zero weights, bias [BIG, 0, ...]: exp(-BIG) underflows to 0 in float32)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from ..tuners.routed_ffn.layer import RoutedFFN
from .checks import PROBABILITY, ExportError, eval_weighting, refusal
from .router import expert_order, folded_router
from .sources import unwrapped_weights

FORCED_LOGIT = 1e4
CAPACITY = 2**31 - 1  # tokens per expert and sequence: more than any sequence has
SWITCH = "SwitchTransformersForConditionalGeneration"


def build_switch(peft_model: nn.Module, target: str | None = None):
    if target not in (None, "switch_transformers"):
        raise ExportError(f"An encoder-decoder exports to target='switch_transformers' only, got {target!r}.")
    base = peft_model.get_base_model()
    config = peft_model.peft_config[peft_model.active_adapter]
    adapter = peft_model.active_adapter
    src = base.config
    if src.model_type != "t5" or getattr(src, "is_gated_act", False):
        raise refusal(
            f"a routed FFN of a {src.model_type} model"
            + (" with a gated FFN" if getattr(src, "is_gated_act", False) else ""),
            "Switch Transformers' experts are the original T5's non-gated FFN (relu, wi and wo)",
            "a T5 base model whose feed_forward_proj is not gated (t5-small, t5-base, ...)",
        )
    stacks = {"encoder": base.encoder.block, "decoder": base.decoder.block}
    layers, num_experts = {}, None
    for side, blocks in stacks.items():
        for i, block in enumerate(blocks):
            ffn = block.layer[-1].DenseReluDense
            if isinstance(ffn, RoutedFFN):
                layers[(side, i)] = _routed_layer(ffn.blocks[adapter], config, f"{side}.block.{i}")
                num_experts = layers[(side, i)][0].shape[0]
            else:
                layers[(side, i)] = (ffn.wi.weight.detach(), ffn.wo.weight.detach())
    if num_experts is None:
        raise ExportError("The model has no routed FFN to export.")
    d_ff = max(layer[0].shape[-2] if len(layer) == 2 else layer[2].shape[1] for layer in layers.values())
    has_bias = any(len(layer) == 2 or layer[1] is not None for layer in layers.values())
    switch_config = SwitchTransformersConfig(
        vocab_size=src.vocab_size,
        d_model=src.d_model,
        d_kv=src.d_kv,
        d_ff=d_ff,
        num_layers=src.num_layers,
        num_sparse_encoder_layers=src.num_layers,
        num_decoder_layers=src.num_decoder_layers,
        num_sparse_decoder_layers=src.num_decoder_layers,
        num_heads=src.num_heads,
        num_experts=num_experts,
        expert_capacity=CAPACITY,
        router_bias=has_bias,
        router_jitter_noise=0.0,
        router_dtype="float32",
        relative_attention_num_buckets=src.relative_attention_num_buckets,
        relative_attention_max_distance=src.relative_attention_max_distance,
        dropout_rate=src.dropout_rate,
        layer_norm_epsilon=src.layer_norm_epsilon,
        dense_act_fn=src.dense_act_fn,
        pad_token_id=src.pad_token_id,
        eos_token_id=src.eos_token_id,
        decoder_start_token_id=src.decoder_start_token_id,
        tie_word_embeddings=src.tie_word_embeddings,
        architectures=[SWITCH],
    )
    state = {k: v.float() for k, v in unwrapped_weights(base, skip=r"\.DenseReluDense\.").items()}
    for (side, i), layer in layers.items():
        prefix = f"{side}.block.{i}.layer.{len(stacks[side][i].layer) - 1}.mlp."
        state.update(_layer_state(prefix, layer, num_experts, d_ff, src.d_model, has_bias))
    model = SwitchTransformersForConditionalGeneration(switch_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (src.tie_word_embeddings and k in ("lm_head.weight",))]
    missing = [k for k in missing if not k.endswith("embed_tokens.weight")]  # tied to `shared`
    if unexpected or missing:
        raise ExportError(
            f"Cannot export to {SWITCH}: weights with no place in it {unexpected[:5]}, or left unset {missing[:5]}."
        )
    model.generation_config = base.generation_config
    return model.eval()


def _routed_layer(block, config, name: str):
    router, bank = block.router, block.experts
    weighting = eval_weighting(config, router)
    if weighting != PROBABILITY or router.top_k != 1:
        raise refusal(
            f"block {name} (router {router.name!r}, top_k={router.top_k})",
            "Switch routes each token to one expert and scales its output by that expert's probability",
            "router='top_k' with top_k=1",
        )
    if bank.gated or bank.bi is not None or bank.bo is not None:
        raise refusal(f"block {name}", "Switch's experts are T5's non-gated FFN without biases", "a T5 base model")
    act = bank.act
    if float(act(torch.zeros(1)).abs().max()) != 0.0:
        raise refusal(
            f"block {name}",
            "its activation is not 0 at 0, so zero-padded neurons would add to the output",
            "relu or gelu",
        )
    weight, bias = folded_router(router)
    order = expert_order(router)
    return weight, bias, bank.wi.detach()[order], bank.wo.detach()[order]  # wi (N, D, E), wo (N, E, D)


def _layer_state(prefix, layer, num_experts, d_ff, d_model, has_bias) -> dict[str, torch.Tensor]:
    state = {}
    if len(layer) == 2:  # dense: every token to expert 0 = the dense FFN, with probability exactly 1
        wi, wo = layer
        weight = torch.zeros(num_experts, d_model)
        bias = torch.zeros(num_experts)
        bias[0] = FORCED_LOGIT
        experts_wi = [wi.float()] + [torch.zeros_like(wi, dtype=torch.float32)] * (num_experts - 1)
        experts_wo = [wo.float()] + [torch.zeros_like(wo, dtype=torch.float32)] * (num_experts - 1)
    else:
        weight, bias, wi, wo = layer
        experts_wi = [w.t().float() for w in wi]  # (E, D)
        experts_wo = [w.t().float() for w in wo]  # (D, E)
    state[prefix + "router.classifier.weight"] = weight
    if has_bias:
        state[prefix + "router.classifier.bias"] = bias if bias is not None else torch.zeros(num_experts)
    for j in range(num_experts):
        e_wi, e_wo = experts_wi[j], experts_wo[j]
        pad = d_ff - e_wi.shape[0]
        state[f"{prefix}experts.expert_{j}.wi.weight"] = torch.cat([e_wi, e_wi.new_zeros(pad, e_wi.shape[1])])
        state[f"{prefix}experts.expert_{j}.wo.weight"] = torch.cat([e_wo, e_wo.new_zeros(e_wo.shape[0], pad)], 1)
    return state
