"""A learned router as a native router's Linear: BatchNorm's running statistics and the temperature folded in."""

from __future__ import annotations

import torch
from torch import nn

from ..routers.base import Router, RouterNetwork
from .checks import EXPORT_READY, refusal


@torch.no_grad()
def folded_router(router: Router) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (N, D), b (N,) or None) with logits = x W^T + b equal to the router's logits at evaluation (float32)."""
    if router.name == "monolithic":  # one expert: any logit routes to it with weight 1
        return torch.zeros(1, router.in_features), None
    network = router.network
    if not isinstance(network, RouterNetwork):
        raise refusal(f"router {router.name!r}", "its network is not a Linear on the hidden state", EXPORT_READY)
    weight = network.proj.weight.detach().float()
    bias = None if network.proj.bias is None else network.proj.bias.detach().float()
    norm = network.norm
    if isinstance(norm, nn.BatchNorm1d):  # evaluation: an affine map per feature, folded into the Linear
        scale = (norm.running_var.float() + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = norm.weight.float() * scale
        shift = -norm.running_mean.float() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.float()
        bias = (weight @ shift) if bias is None else bias + weight @ shift
        weight = weight * scale
    temperature = router.config.router_temperature
    if temperature != 1.0:
        weight = weight / temperature
        bias = None if bias is None else bias / temperature
    return weight, bias


def bias_free_router(router: Router, block: str, target: str) -> torch.Tensor:
    """The router's folded weight for a target whose router has no bias. A bias equal for every expert shifts all
    logits alike, which softmax and top-k ignore; any other bias is refused."""
    weight, bias = folded_router(router)
    if bias is not None and not bool((bias == bias[0]).all()):
        cause = (
            "router_batchnorm=True: at evaluation its BatchNorm folds into the router Linear as a bias"
            if router.config.router_batchnorm
            else "router_bias=True: its router Linear has a trained bias"
        )
        raise refusal(
            f"block {block}",
            f"{cause}, and the router of {target} is a Linear without bias",
            "router_batchnorm=False and router_bias=False",
        )
    return weight


def expert_order(router: Router) -> torch.Tensor:
    """Bank expert of each router output (`expert_permutation`'s map, else the identity)."""
    expert_map = getattr(router, "expert_map", None)
    return torch.arange(router.num_experts) if expert_map is None else expert_map.detach().cpu()
