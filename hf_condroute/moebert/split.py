"""MoEBERT's split of a dense FFN into experts (Zuo et al. 2022, section 3.2).

The `shared_neurons` most important neurons go to every expert; the others, from the most important down,
are dealt round-robin to the experts, each taking `expert_dim - shared_neurons` of them. When the experts
have fewer slots than there are unshared neurons, the least important ones are left out (MoEBERT's
BERT-base setting keeps 1536 of 3072).
"""

from __future__ import annotations

import torch


def default_expert_dim(ffn_dim: int, num_experts: int, shared_neurons: int) -> int:
    """The largest expert size that uses every unshared neuron at most once: s + (I - s) // N."""
    return shared_neurons + (ffn_dim - shared_neurons) // num_experts


def check_shared(expert_dim: int, shared_neurons: int) -> None:
    """The shared neurons are part of every expert, so there cannot be more of them than an expert has."""
    if shared_neurons > expert_dim:
        raise ValueError(
            f"shared_neurons={shared_neurons} is larger than expert_dim={expert_dim}: the shared neurons are part of "
            "every expert. Lower shared_neurons or raise expert_dim."
        )


def check_split(ffn_dim: int, num_experts: int, expert_dim: int, shared_neurons: int, layer: str = "") -> None:
    """Raise a ValueError naming the problem and the fix when the FFN cannot be split this way."""
    where = f"the FFN of {layer}" if layer else "the FFN"
    if shared_neurons > ffn_dim:
        raise ValueError(
            f"shared_neurons={shared_neurons} is larger than {where}, which has {ffn_dim} neurons: the shared neurons "
            f"are some of the FFN's own. Use shared_neurons < {ffn_dim} (MoEBERT shares 512 of BERT-base's 3072, "
            f"a sixth: {ffn_dim // 6} here), or 0."
        )
    check_shared(expert_dim, shared_neurons)
    if expert_dim > ffn_dim:
        raise ValueError(
            f"expert_dim={expert_dim} is larger than {where}, which has {ffn_dim} neurons: an expert is a slice of the "
            f"FFN. Use expert_dim <= {ffn_dim} (MoEBERT: about {ffn_dim // num_experts} for {num_experts} experts), or "
            "leave expert_dim=None for the largest size that uses every neuron once."
        )
    unshared_slots = num_experts * (expert_dim - shared_neurons)
    if unshared_slots > ffn_dim - shared_neurons:
        raise ValueError(
            f"expert_dim={expert_dim} with shared_neurons={shared_neurons} needs {num_experts} x "
            f"{expert_dim - shared_neurons} = {unshared_slots} unshared neurons, but {where} has only "
            f"{ffn_dim - shared_neurons} besides the shared ones. Use expert_dim <= "
            f"{default_expert_dim(ffn_dim, num_experts, shared_neurons)}, raise shared_neurons, or use fewer experts."
        )


def assign_neurons(
    importance: torch.Tensor, num_experts: int, expert_dim: int, shared_neurons: int, layer: str = ""
) -> torch.Tensor:
    """Neuron indices of each expert, a LongTensor (num_experts, expert_dim), each row in increasing order.

    Ties in importance keep index order, so equal scores (e.g. all zero) give a deterministic split.
    """
    importance = torch.as_tensor(importance).detach().float().reshape(-1).cpu()
    ffn_dim = importance.numel()
    check_split(ffn_dim, num_experts, expert_dim, shared_neurons, layer)
    order = torch.argsort(importance, descending=True, stable=True)
    shared, rest = order[:shared_neurons], order[shared_neurons:]
    own = expert_dim - shared_neurons
    rows = [torch.cat([shared, rest[e::num_experts][:own]]).sort().values for e in range(num_experts)]
    return torch.stack(rows)
