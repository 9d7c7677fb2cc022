"""Reading a routed causal LM as native pieces: per decoder layer either a dense MLP or an MoE layer (a bias-free
router and N SwiGLU experts, optionally a shared expert), plus every other weight of the base model.

Two tuners have such a form: the routed FFN (MoEBERT slices of the dense MLP: expert i is its neurons as gate/up/down
projections) and a routed LoRA whose MLP projections share one router (expert i's projections are W + s B_i A_i)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..experts import LoraBank
from ..tuners.routed_ffn.layer import RoutedFFN
from ..tuners.routed_lora.layer import RoutedLoraLayer
from ..tuners.routed_lora.sharing import SharedRouter
from .checks import EXPORT_READY, ONE, RENORMALISED, eval_weighting, refusal
from .router import bias_free_router, expert_order

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NATIVE_ROUTER = "Mixtral / Qwen2-MoE"


@dataclass
class MoELayer:
    router: torch.Tensor  # (N, D) float32, bias-free
    gate: torch.Tensor  # (N, E, D)
    up: torch.Tensor  # (N, E, D)
    down: torch.Tensor  # (N, D, E)
    weighting: str  # checks.RENORMALISED / PROBABILITY / ONE
    top_k: int
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # gate (S, D), up (S, D), down (D, S)


@dataclass
class CausalSource:
    config: object  # the base model's transformers config
    weights: dict[str, torch.Tensor]  # every weight outside the MLPs, under the base model's names
    layers: list[MoELayer | dict[str, torch.Tensor]]  # per layer: MoE, or the dense MLP's {projection: weight}
    generation_config: object = None


def read_causal(peft_model: nn.Module, shared_expert: bool = True) -> CausalSource:
    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    decoder_layers = getattr(getattr(base, "model", None), "layers", None)
    if decoder_layers is None:
        raise refusal(
            f"a {type(base).__name__}",
            "the exporter reads Llama-family causal LMs (model.layers[i].mlp with gate/up/down projections)",
            "a Llama, Mistral or Qwen2 base model",
        )
    layers = []
    for i, layer in enumerate(decoder_layers):
        mlp = layer.mlp
        if isinstance(mlp, RoutedFFN):
            layers.append(_ffn_layer(mlp, config, adapter, f"model.layers.{i}.mlp", shared_expert))
        elif any(isinstance(getattr(mlp, p, None), RoutedLoraLayer) for p in MLP_PROJECTIONS):
            layers.append(_lora_layer(mlp, config, adapter, f"model.layers.{i}.mlp"))
        else:
            layers.append({p: getattr(mlp, p).weight.detach() for p in MLP_PROJECTIONS})
    moe = [layer for layer in layers if isinstance(layer, MoELayer)]
    if any(layer.shared is None for layer in moe):  # one expert width for every layer: all shared experts or none
        for layer in moe:
            _merge_shared(layer)
    return CausalSource(base.config, _other_weights(base, adapter), layers, getattr(base, "generation_config", None))


def _ffn_layer(mlp: RoutedFFN, config, adapter: str, name: str, shared_expert: bool) -> MoELayer:
    block = mlp.blocks[adapter]
    router, bank = block.router, block.experts
    weighting = eval_weighting(config, router)
    if not bank.gated or any(b is not None for b in (bank.bi, bank.bi_gate, bank.bo)):
        raise refusal(
            f"the routed FFN of {name}",
            "native experts are SwiGLU projections without biases, and this FFN is not gated or has biases",
            "a Llama, Mistral or Qwen2 base model",
        )
    order = expert_order(router)
    gate = bank.wi_gate.detach()[order].transpose(1, 2)
    up = bank.wi.detach()[order].transpose(1, 2)
    down = bank.wo.detach()[order].transpose(1, 2)
    moe = MoELayer(bias_free_router(router, name, NATIVE_ROUTER), gate, up, down, weighting, router.top_k)
    if shared_expert and config.shared_neurons and weighting in (RENORMALISED, ONE):
        _extract_shared(moe, bank.neuron_index[order])
    return moe


@torch.no_grad()
def _extract_shared(moe: MoELayer, neuron_index: torch.Tensor) -> None:
    """MoEBERT's shared neurons as one shared expert, where every expert still holds the same copy of them (training
    may have moved the copies apart: then they stay inside each expert, which is exact as well). With weights that
    sum to 1, sum_j w_j shared(x) = shared(x)."""
    n = neuron_index.shape[0]
    shared = neuron_index[0]
    for row in neuron_index[1:]:
        shared = shared[torch.isin(shared, row)]
    if shared.numel() in (0, neuron_index.shape[1]):  # none, or one expert (all of its neurons)
        return
    masks = torch.isin(neuron_index, shared)  # (N, E), each row has the shared neurons in increasing order
    gates = torch.stack([moe.gate[e][masks[e]] for e in range(n)])
    ups = torch.stack([moe.up[e][masks[e]] for e in range(n)])
    downs = torch.stack([moe.down[e][:, masks[e]] for e in range(n)])
    if not all(bool((t == t[0]).all()) for t in (gates, ups, downs)):
        return
    moe.shared = (gates[0], ups[0], downs[0])
    keep = ~masks
    moe.gate = torch.stack([moe.gate[e][keep[e]] for e in range(n)])
    moe.up = torch.stack([moe.up[e][keep[e]] for e in range(n)])
    moe.down = torch.stack([moe.down[e][:, keep[e]] for e in range(n)])


def _merge_shared(moe: MoELayer) -> None:
    """Put an extracted shared expert back into every expert (the neurons' order within an expert does not matter)."""
    if moe.shared is None:
        return
    gate, up, down = moe.shared
    n = moe.gate.shape[0]
    moe.gate = torch.cat([moe.gate, gate.expand(n, -1, -1)], dim=1)
    moe.up = torch.cat([moe.up, up.expand(n, -1, -1)], dim=1)
    moe.down = torch.cat([moe.down, down.expand(n, -1, -1)], dim=2)
    moe.shared = None


def _lora_layer(mlp: nn.Module, config, adapter: str, name: str) -> MoELayer:
    routed = {p: getattr(mlp, p) for p in MLP_PROJECTIONS if isinstance(getattr(mlp, p), RoutedLoraLayer)}
    routers = {p: layer.blocks[adapter].router for p, layer in routed.items()}
    owners = [p for p, r in routers.items() if not isinstance(r, SharedRouter)]
    shared_by_all = len(owners) == 1 and all(
        isinstance(r, SharedRouter) and r.holder.owner == routed[owners[0]].block_name
        for p, r in routers.items()
        if p != owners[0]
    )
    if not shared_by_all:
        raise refusal(
            f"the routed LoRA of {name}",
            "its MLP projections route independently, while a native MoE layer routes each token once for the "
            "whole MLP",
            r"router_sharing=r'layers\.\d+\.mlp' (one router per MLP, MixLoRA's design)",
        )
    owner = owners[0]
    if owner == "down_proj":
        raise refusal(
            f"the routed LoRA of {name}",
            "its shared router reads down_proj's input, while native routers read the MLP's input",
            "gate_proj or up_proj among the target_modules, so the MLP's router reads its input",
        )
    router = routers[owner]
    weighting = eval_weighting(config, router)
    if weighting != ONE:
        raise refusal(
            f"the routed LoRA of {name} (router {router.name!r}, top_k={router.top_k})",
            "a routed LoRA mixes its experts inside each projection (W + sum_j w_j s B_j A_j), which equals a "
            "mixture of expert MLPs only when each token runs one expert with weight 1",
            f"router='st_gumbel' or 'reinforce' with top_k=1 (or a routed FFN with {EXPORT_READY})",
        )
    order = expert_order(router)
    experts = {}
    for p in MLP_PROJECTIONS:
        module = getattr(mlp, p)
        if p in routed:
            bank: LoraBank = module.blocks[adapter].experts
            base = module.get_base_layer().weight.detach()
            delta = torch.einsum("nir,nro->noi", bank.lora_A.detach().float(), bank.lora_B.detach().float())
            experts[p] = (base.float() + bank.scaling * delta[order]).to(base.dtype)
        else:
            experts[p] = module.weight.detach().expand(router.num_experts, -1, -1)
    return MoELayer(
        bias_free_router(router, name, NATIVE_ROUTER),
        experts["gate_proj"],
        experts["up_proj"],
        experts["down_proj"],
        weighting,
        router.top_k,
    )


@torch.no_grad()
def _other_weights(base: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Every weight outside the MLPs, with PEFT's wrappers taken off: modules_to_save copies replace the originals,
    a monolithic routed LoRA (one expert, weight 1: a plain LoRA) is merged; routed attention is refused."""
    out = unwrapped_weights(base, skip=r"\.mlp\.")
    for name, module in base.named_modules():
        if not isinstance(module, RoutedLoraLayer) or ".mlp." in name or adapter not in module.blocks:
            continue
        block = module.blocks[adapter]
        if block.router.name != "monolithic":
            raise refusal(
                f"the routed LoRA on {name}",
                "routed attention has no native form: native MoE layers route the MLP only",
                "target_modules on the MLP projections (gate_proj, up_proj, down_proj) only, or a plain LoRA on "
                "attention merged before routing",
            )
        bank = block.experts
        delta = (bank.lora_A[0].float() @ bank.lora_B[0].float()).t() * bank.scaling
        weight = module.get_base_layer().weight
        out[name + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return out


@torch.no_grad()
def unwrapped_weights(base: nn.Module, skip: str) -> dict[str, torch.Tensor]:
    """The base model's weights under its own names (PEFT's `base_layer` and `modules_to_save` wrappers taken off:
    the trained copy replaces the original), leaving out adapters and keys matching `skip`."""
    out = {}
    for key, value in base.state_dict().items():
        if re.search(skip, key) or "routed_lora_block" in key or ".original_module." in key:
            continue
        out[re.sub(r"\.modules_to_save\.[^.]+", "", key.replace(".base_layer", ""))] = value.detach()
    return out
