"""The router interface: rows in, a routing decision out, plus the auxiliary losses the router wants.

A router sees R rows of routing features (one per example, or one per non-padding token) and returns which
of its N experts each row runs through and with what weight. Learned routers share one network, paper A's
BatchNorm + Linear (+ softmax), and the generic auxiliary terms; each family only says how it selects.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from . import losses
from .norm import RouterBatchNorm1d, batchnorm_linear

if TYPE_CHECKING:  # the config reads the routers' capabilities; routers only read config fields
    from .config import RoutingConfig


@dataclass
class RoutingDecision:
    """What a router chose for R rows.

    experts: LongTensor (R, k), -1 marks an empty slot (Expert Choice gives rows different counts).
    weights: (R, k) multipliers of the chosen experts' outputs (0 in empty slots).
    probs:   (R, N) the router's distribution (one-hot for heuristic routers; the gate weights of `dselect_k` and
             `comet`, which sum to less than 1 for DSelect-k with N not a power of two until its selectors saturate).
    logits:  the router's differentiable scores, from which `Router.routing_probs` and its auxiliary losses are
             computed: (R, N) softmax logits, or for gate routers (`softmax_logits = False`) their own
             pre-activations (R, width); None for heuristic routers.
    baseline: (R,) REINFORCE's learned baseline, else None.
    dropped: (R, k) with `expert_capacity_factor`: the expert a slot asked for that was over capacity (that slot's
        `experts` entry is then -1, its weight 0), -1 where nothing was dropped; None without a capacity limit.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    dropped: torch.Tensor | None = None

    def requested_experts(self) -> torch.Tensor:
        """The experts the router chose, before any capacity limit (what its auxiliary losses are computed on)."""
        return self.experts if self.dropped is None else torch.where(self.dropped >= 0, self.dropped, self.experts)


HALF_DTYPES = (torch.float16, torch.bfloat16)


class RouterNetwork(nn.Module):
    """Paper A's router: BatchNorm1d (whose running statistics are right after a short run, see `norm`) then Linear
    to N logits (the softmax is applied by the router)."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        batchnorm: bool = True,
        init_std: float | None = None,
        bias: bool = True,
    ):
        super().__init__()
        self.norm = RouterBatchNorm1d(in_features) if batchnorm else nn.Identity()
        self.proj = nn.Linear(in_features, num_experts, bias=bias)
        if init_std is not None:
            nn.init.normal_(self.proj.weight, std=init_std)
            if bias:
                nn.init.zeros_(self.proj.bias)

    @property
    def dtype(self) -> torch.dtype:  # read per call by `run_in_float32`: cheaper than walking parameters()
        return self.proj.weight.dtype

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return batchnorm_linear(self.norm, self.proj, x, valid)  # in training one fused node (see `norm`)


class Router(nn.Module):
    """Base class. Subclasses set the class attributes and implement `select` (learned) or `forward`."""

    name: ClassVar[str] = ""
    learned: ClassVar[bool] = True  # owns a router network and produces logits
    stochastic: ClassVar[bool] = False  # samples in training, deterministic in eval
    uses_top_k: ClassVar[bool] = True
    min_top_k: ClassVar[int] = 1
    min_top_k_reason: ClassVar[str] = ""
    needs_tags: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False
    needs_reward: ClassVar[bool] = False
    default_jitter: ClassVar[float] = 0.0
    merges_experts: ClassVar[bool] = False  # weights average the experts' parameters, not their outputs (SMEAR)
    per_example_only: ClassVar[bool] = False  # refuses routing_granularity="token", for `per_example_only_reason`
    per_example_only_reason: ClassVar[str] = ""
    # decision.logits are (R, N) softmax logits of probs; False: the router's own pre-activations (gates), on which
    # `routing_probs` is overridden and z-loss and a logit temperature are refused
    softmax_logits: ClassVar[bool] = True
    # the number of slots per row depends on the data (-1 marks empty slots), not fixed at top_k
    variable_width: ClassVar[bool] = False
    token_choice: ClassVar[bool] = True  # each row picks its experts (False: experts pick rows, as Expert Choice)

    @classmethod
    def capacity_applies(cls) -> bool:
        """Whether `expert_capacity_factor` limits this router: learned and token-choice (see `capacity.py`)."""
        return cls.learned and cls.token_choice

    def __init__(self, in_features: int, num_experts: int, config: RoutingConfig, block_name: str = ""):
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = min(config.top_k, num_experts) if self.uses_top_k else num_experts
        self.config = config
        self.block_name = block_name
        # a custom router written before `valid` (see `forward`) cannot be told a traced padded batch's real rows
        self.takes_valid = "valid" in inspect.signature(self.forward).parameters
        mapping = config.tag_mapping_for(block_name)
        self.num_tags = len(mapping) if mapping is not None else num_experts
        table = torch.tensor(mapping if mapping is not None else range(num_experts), dtype=torch.long)
        # derived from the config, so not saved: a changed mapping in a loaded config takes effect
        self.register_buffer("tag_to_expert", table, persistent=False)
        jitter = config.router_jitter_noise
        self.jitter = self.default_jitter if jitter is None else jitter
        if self.learned:
            self.network = self.build_network(in_features, num_experts, config)
        if config.expert_permutation:
            # router output j is computed by bank expert expert_map[j]; `integrations.local_search` searches it
            self.register_buffer("expert_map", torch.arange(self.num_experts))

    def bank_experts(self, experts: torch.Tensor) -> torch.Tensor:
        """The bank's experts for a decision's experts (the same without `expert_permutation`); -1 stays -1."""
        expert_map = getattr(self, "expert_map", None)
        if expert_map is None:
            return experts
        return torch.where(experts >= 0, expert_map[experts.clamp(min=0)], experts)

    # ----- learned routers -------------------------------------------------------------------------
    def build_network(self, in_features: int, num_experts: int, config: RoutingConfig) -> nn.Module:
        return RouterNetwork(
            in_features, num_experts, config.router_batchnorm, config.router_init_std, config.router_bias
        )

    def _apply(self, fn, recurse=True):
        # Routing maths stays float32 whatever the model's dtype (as transformers' Switch router): a cast of the model
        # (PEFT moving an adapter to its base layer's dtype, `model.half()`, `.to(torch.bfloat16)`) moves the router's
        # parameters and BatchNorm statistics to the new device but keeps their float32 values.
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in HALF_DTYPES:
                return t.to(out.device)
            return out

        return super()._apply(keep_float32, recurse)

    def compute_logits(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The router network's logits for the rows x; `valid` (R,) marks the real rows of a traced padded batch (its
        BatchNorm's batch statistics are taken over them)."""
        if self.training and self.config.router_batchnorm and x.shape[0] < 2:
            raise ValueError(
                f"Router of block {self.block_name or '<unnamed>'} got {x.shape[0]} routing row in training: its "
                "BatchNorm needs at least 2. Use a batch of 2 or more examples, per-token routing, or "
                "`router_batchnorm=False`."
            )
        if self.config.router_detach_input:  # no routing gradient reaches the layers below (or earlier adapters)
            x = x.detach()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = run_in_float32(self.network, x, valid)
        temperature = self.config.router_temperature
        return logits if temperature == 1.0 else logits / temperature

    def forward(
        self, x: torch.Tensor, tags=None, keys=None, step: int | None = None, valid: torch.Tensor | None = None
    ) -> RoutingDecision:
        """Decide for the rows x. `valid` (R,) bool: given only under torch.compile on a padded batch, whose padding
        tokens stay rows (fixed shapes); True marks the real rows, the ones eager routes."""
        logits = self.compute_logits(x, valid)
        return self.select(logits, x)

    def select(self, logits: torch.Tensor, x: torch.Tensor) -> RoutingDecision:
        raise NotImplementedError

    # ----- tags -----------------------------------------------------------------------------------
    def tag_targets(self, tags: torch.Tensor) -> torch.Tensor:
        """Map tags to experts, keeping -100 (unknown); raise a clear error for tags out of range."""
        known = tags != -100
        bad = known & ((tags < 0) | (tags >= self.num_tags))
        if torch.compiler.is_compiling():  # traced: checked on the device, without a host sync that breaks the graph
            torch._assert_async(
                ~bad.any(),
                f"routing_tags out of range in block {self.block_name or '<unnamed>'}: tags must be in "
                f"0..{self.num_tags - 1} (or -100 for unknown).",
            )
        elif bool(bad.any()):
            values = sorted({int(t) for t in tags[bad].unique().tolist()})
            raise ValueError(
                f"routing_tags out of range in block {self.block_name or '<unnamed>'}: got {values}, but tags must be "
                f"in 0..{self.num_tags - 1} (or -100 for unknown). Raise num_experts, or pass `tag_to_expert` to map "
                "more tags onto the experts."
            )
        return torch.where(known, self.tag_to_expert[tags.clamp(min=0)], torch.full_like(tags, -100))

    def routing_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The (R, N) distribution that `decision.logits` encode (differentiably): their softmax by default."""
        return logits.softmax(dim=-1)

    # ----- auxiliary losses -----------------------------------------------------------------------
    def loss_coefficients(self) -> dict[str, float]:
        """Weighted auxiliary terms this router adds; zero-weight terms are left out."""
        if not self.learned:
            return {}
        c = self.config
        coefs = {
            "load_balance": c.router_aux_loss_coef,
            "z_loss": c.router_z_loss_coef,
            "tag_supervision": c.tag_supervision_coef,
            "trimmed_lasso": c.trimmed_lasso_coef,
        }
        return {k: v for k, v in coefs.items() if v > 0}

    def loss_terms(
        self,
        logits: torch.Tensor,
        experts: torch.Tensor,
        baseline: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        reward: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted auxiliary losses of one decision, as functions of its logits (and baseline); means over the
        `valid` rows where given (see `losses`)."""
        coefs = self.loss_coefficients()
        terms: dict[str, torch.Tensor] = {}
        probs = self.routing_probs(logits)
        if "load_balance" in coefs:
            terms["load_balance"] = coefs["load_balance"] * losses.load_balancing_loss(
                probs, experts, self.num_experts, valid
            )
        if "z_loss" in coefs:
            terms["z_loss"] = coefs["z_loss"] * losses.router_z_loss(logits, valid)
        if "tag_supervision" in coefs and targets is not None:
            scores = logits if self.softmax_logits else probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
            terms["tag_supervision"] = coefs["tag_supervision"] * losses.tag_supervision_loss(scores, targets, valid)
        if "trimmed_lasso" in coefs:
            terms["trimmed_lasso"] = coefs["trimmed_lasso"] * losses.trimmed_lasso_loss(probs, self.top_k, valid)
        return terms

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_experts={self.num_experts}, top_k={self.top_k}"


def run_in_float32(network: nn.Module, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """network(x) in the network's dtype (float32, see `Router._apply`; float64 after `.double()`), autocast off, as
    a float32 result: transformers' Switch router computes the same way. `valid` (the real rows, see
    `Router.forward`) is passed on only where given."""
    dtype = network.dtype if isinstance(network, RouterNetwork) else next(network.parameters()).dtype
    # entering autocast's context costs more than a decoding step's router: only when autocast is on
    off = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
    with off:
        return (network(x.to(dtype)) if valid is None else network(x.to(dtype), valid)).float()


def top_k_with_probs(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the k largest probabilities and those probabilities (not renormalised)."""
    values, experts = probs.topk(k, dim=-1)
    return experts, values


def equal_weights(experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(experts.shape, 1.0 / experts.shape[-1], dtype=dtype, device=experts.device)


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))
