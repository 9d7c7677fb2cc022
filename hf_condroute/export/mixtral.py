"""Native causal MoE targets: `MixtralForCausalLM` (every layer MoE, weights renormalised, no shared expert) and
`Qwen2MoeForCausalLM` (otherwise: `norm_topk_prob` either way, a shared expert, `mlp_only_layers` for dense layers).

Both route as transformers' code does (models/mixtral, models/qwen2_moe): logits = F.linear(x, gate.weight), softmax in
float32, top-k, weights renormalised (Mixtral always; Qwen2-MoE with `norm_topk_prob`), experts SwiGLU stored as
`gate_up_proj` (N, 2E, D) and `down_proj` (N, D, E). Qwen2-MoE adds sigmoid(shared_expert_gate(x)) *
shared_expert(x): a zero gate weight gives exactly 0.5, so the shared neurons go in with their down projection
doubled (a power of two: no rounding)."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from .checks import PROBABILITY, ExportError
from .sources import CausalSource, MoELayer

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# without shared neurons, Qwen2-MoE's shared expert is all zeros (act(0) * 0 = 0 adds nothing); not empty, since
# llama.cpp reads a zero width as "the dense width" and then fails to load the model; and its gate is not zero, since
# llama.cpp computes sigmoid(z) as silu(z) / z, NaN at z = 0 (the gate's value is irrelevant: it multiplies zeros)
ZERO_SHARED = 16
TARGETS = ("mixtral", "qwen2_moe")
_COMMON = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def mixtral_blockers(source: CausalSource) -> list[str]:
    """Why the source needs Qwen2-MoE rather than Mixtral (empty: Mixtral holds it exactly)."""
    moe = [layer for layer in source.layers if isinstance(layer, MoELayer)]
    out = []
    if len(moe) < len(source.layers):
        out.append("some layers stay dense (Mixtral's layers are all MoE)")
    if any(layer.weighting == PROBABILITY for layer in moe):
        out.append("the chosen experts' weights are not renormalised (Mixtral always renormalises)")
    if any(layer.shared is not None for layer in moe):
        out.append("MoEBERT's shared neurons form a shared expert (Mixtral has none)")
    if source.config.model_type == "qwen2":
        out.append("Qwen2 attention has q/k/v biases (Mixtral's has none)")
    return out


def build_causal_moe(source: CausalSource, target: str | None = None):
    """The native model (float32, evaluation mode) for a read source."""
    model_type = source.config.model_type
    if model_type not in LLAMA_FAMILY:
        raise ExportError(
            f"Cannot export a routed {model_type!r} model to Mixtral / Qwen2-MoE: their attention and norms are the "
            f"Llama family's ({', '.join(LLAMA_FAMILY)}). Route a model of that family."
        )
    moe = [layer for layer in source.layers if isinstance(layer, MoELayer)]
    if not moe:
        raise ExportError("The model has no routed MLP layer to export (no routed FFN, no routed LoRA on the MLP).")
    if target not in (None, *TARGETS):
        raise ExportError(f"target must be one of {TARGETS} (or None to choose), got {target!r}.")
    blockers = mixtral_blockers(source)
    if target == "mixtral" and blockers:
        raise ExportError("Cannot export to Mixtral: " + "; ".join(blockers) + ". Use target='qwen2_moe'.")
    target = target or ("qwen2_moe" if blockers else "mixtral")
    if getattr(source.config, "attention_bias", False):
        raise ExportError(
            "Cannot export: the Llama attention has biases (attention_bias=True), and Mixtral's and Qwen2-MoE's output "
            "projection has none. Route a model without attention biases."
        )
    first = moe[0]
    common = {k: getattr(source.config, k) for k in _COMMON if hasattr(source.config, k)}
    common["head_dim"] = getattr(source.config, "head_dim", None) or (
        source.config.hidden_size // source.config.num_attention_heads
    )
    num_experts, expert_dim = first.gate.shape[0], first.gate.shape[1]
    if target == "mixtral":
        config = MixtralConfig(
            **common,
            intermediate_size=expert_dim,
            num_local_experts=num_experts,
            num_experts_per_tok=first.top_k,
            router_jitter_noise=0.0,
            sliding_window=getattr(source.config, "sliding_window", None),
        )
        model_cls = MixtralForCausalLM
    else:
        shared = next((layer.shared for layer in moe if layer.shared is not None), None)
        sliding = {
            k: getattr(source.config, k)
            for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
            if getattr(source.config, k, None) is not None
        }
        config = Qwen2MoeConfig(
            **common,
            **sliding,
            intermediate_size=source.config.intermediate_size,
            moe_intermediate_size=expert_dim,
            shared_expert_intermediate_size=ZERO_SHARED if shared is None else shared[0].shape[0],
            num_experts=num_experts,
            num_experts_per_tok=first.top_k,
            norm_topk_prob=first.weighting != PROBABILITY,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, layer in enumerate(source.layers) if not isinstance(layer, MoELayer)],
            qkv_bias=True,  # Qwen2's; zeros for a Llama source (engines such as vLLM expect the biases)
        )
        model_cls = Qwen2MoeForCausalLM
    config.architectures = [model_cls.__name__]
    state = _state_dict(source, target, config)
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise ExportError(
            f"Cannot export to {model_cls.__name__}: the source has weights with no place in it: {unexpected[:5]}. "
            "Route a model whose other modules are the Llama family's."
        )
    if missing:
        raise ExportError(f"Export to {model_cls.__name__} left weights unset: {missing[:5]} (please report this).")
    if source.generation_config is not None:
        model.generation_config = source.generation_config
    return model.eval()


def _state_dict(source: CausalSource, target: str, config) -> dict[str, torch.Tensor]:
    state = {k: v.float() for k, v in source.weights.items()}
    for i, layer in enumerate(source.layers):
        prefix = f"model.layers.{i}.mlp."
        if not isinstance(layer, MoELayer):
            state.update({f"{prefix}{p}.weight": w.float() for p, w in layer.items()})
            continue
        state[prefix + "gate.weight"] = layer.router
        state[prefix + "experts.gate_up_proj"] = torch.cat([layer.gate, layer.up], dim=1).float()
        state[prefix + "experts.down_proj"] = layer.down.float()
        if target == "qwen2_moe":
            width = config.shared_expert_intermediate_size
            gate, up, down = layer.shared or (torch.zeros(width, config.hidden_size),) * 2 + (
                torch.zeros(config.hidden_size, width),
            )
            state[prefix + "shared_expert.gate_proj.weight"] = gate.float()
            state[prefix + "shared_expert.up_proj.weight"] = up.float()
            state[prefix + "shared_expert.down_proj.weight"] = 2.0 * down.float()  # sigmoid(0) = 0.5
            gate_weight = torch.zeros(1, config.hidden_size) if layer.shared else torch.ones(1, config.hidden_size)
            state[prefix + "shared_expert_gate.weight"] = gate_weight
    if target == "qwen2_moe":
        for i in range(config.num_hidden_layers):
            for p in ("q_proj", "k_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{p}"
                state.setdefault(key + ".bias", torch.zeros(state[key + ".weight"].shape[0]))
    return state
