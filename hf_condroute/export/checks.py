"""What can leave the package exactly, and the refusals for what cannot.

A native MoE router (Mixtral, Qwen2-MoE, Switch) is a Linear on each token's hidden state, a softmax, a top-k and the
expert outputs weighted by the chosen probabilities (renormalised or not). A routed model exports exactly when its
evaluation routing is that; everything else gets one `ExportError` naming the blocker and what to train with instead.
"""

from __future__ import annotations

from ..routers.base import Router

EXPORT_READY = "router='top_k', routing_granularity='token', router_batchnorm=False, router_bias=False"

# how the chosen experts are weighted at evaluation
RENORMALISED = "renormalised"  # the k chosen probabilities, summing to 1 (Mixtral; Qwen2-MoE norm_topk_prob=True)
PROBABILITY = "probability"  # the chosen probabilities as they are (Qwen2-MoE norm_topk_prob=False; Switch)
ONE = "one"  # a single expert with weight 1 (top-1 renormalised)

# routers with no native form at all: (what blocks it, what to train with instead)
REFUSED_ROUTERS = {
    "tag": (
        "it routes on tags passed with each example, which no inference engine receives",
        "`hf_condroute.save_expert_loras` (routed LoRA) to serve each expert as an ordinary LoRA picked by tag, or "
        f"a learned router ({EXPORT_READY})",
    ),
    "hash": (
        "it routes on the token id, while native MoE routers are a Linear on the hidden state",
        EXPORT_READY,
    ),
    "expert_choice": (
        "its experts choose tokens across the whole batch, while native MoE routers are token-choice",
        EXPORT_READY,
    ),
    "x_moe": (
        "its logits are cosine similarities in a learned low-dimensional space with a learned temperature, not a "
        "Linear of the hidden state",
        EXPORT_READY,
    ),
    "dselect_k": ("its gate is built from smooth-steps of binary codes, not a softmax over a Linear", EXPORT_READY),
    "comet": ("its gate is a tree of smooth-steps, not a softmax over a Linear", EXPORT_READY),
    "smear": ("it averages the experts' parameters per example instead of choosing experts", EXPORT_READY),
}
# routers whose evaluation weights are equal (1/k or 1 each): exact for one expert only
EQUAL_WEIGHT_ROUTERS = {"st_gumbel", "reinforce", "moesart"}
SOFTMAX_TOP_K_ROUTERS = {"top_k", "v_moe", "smoe"}  # their noise is training-only


class ExportError(ValueError):
    """A routed model (or one of its settings) has no exact native form."""


def refusal(what: str, why: str, instead: str) -> ExportError:
    return ExportError(f"Cannot export {what} to a native transformers model: {why}. Train with {instead} instead.")


def eval_weighting(config, router: Router) -> str:
    """How the routed model weights its chosen experts at evaluation (RENORMALISED, PROBABILITY or ONE), or an
    ExportError when no native router does the same."""
    name = router.name
    if name in REFUSED_ROUTERS:
        why, instead = REFUSED_ROUTERS[name]
        raise refusal(f"router {name!r}", why, instead)
    if config.routing_granularity != "token":
        raise refusal(
            "per-example routing",
            "each example is routed once on the mean of its tokens, and no inference engine pools a sequence to route",
            f"routing_granularity='token' ({EXPORT_READY})",
        )
    if config.expert_capacity_factor is not None:
        raise refusal(
            f"expert_capacity_factor={config.expert_capacity_factor}",
            "a capacity limit drops tokens at evaluation depending on the rest of the batch, which no native model "
            "reproduces (Mixtral and Qwen2-MoE have no capacity; Switch counts it along each sequence)",
            "expert_capacity_factor=None (a load-balancing loss, router_aux_loss_coef, keeps experts balanced)",
        )
    if name == "monolithic":
        return ONE
    if name == "softmax":
        return RENORMALISED  # every expert, weighted by probabilities that already sum to 1
    if name in EQUAL_WEIGHT_ROUTERS:
        if router.top_k == 1:
            return ONE
        raise refusal(
            f"router {name!r} with top_k={router.top_k}",
            f"at evaluation it weights each of its {router.top_k} experts equally, not by their probabilities",
            f"top_k=1, or router='top_k' with norm_topk_prob=True ({EXPORT_READY})",
        )
    if name in SOFTMAX_TOP_K_ROUTERS:
        return RENORMALISED if config.norm_topk_prob and router.top_k > 1 else PROBABILITY
    raise refusal(f"router {name!r}", "the exporter does not know its evaluation routing", EXPORT_READY)
