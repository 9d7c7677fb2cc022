"""The routed block: it asks the router, dispatches to the expert bank, combines, records the decision and
hands the router's auxiliary losses to the forward's `RoutingStep`.

Every place that routes uses this block: the PEFT adapter tuner, the routed FFN, DAE-Syn and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..experts import ExpertBank
from ..routers import Router
from ..routers.base import RoutingDecision
from ..routers.capacity import limit_capacity
from .step import RoutingRecord, RoutingStep


@dataclass
class RoutingInputs:
    """What a block needs besides its hidden states. Leading dimensions are the batch. Tags must have one row per
    example; the tensors the library derives once per example (mask, pooled features, content keys) are repeated
    when the batch is a multiple of their rows (beam search expands each example after the encoder ran)."""

    mask: torch.Tensor | None = None  # (B, L) 1 for real tokens; longer masks are right-aligned to L
    pooled: torch.Tensor | None = None  # (B, D') per-example routing features replacing the mean of x
    tags: torch.Tensor | None = None  # (B,) or (B, G) long, -100 unknown
    keys: torch.Tensor | None = None  # (B,) per-example hash keys, or (B, L) per-token ones (replace token_ids)
    token_ids: torch.Tensor | None = None  # (B, L) token ids, the keys of per-token hash routing
    step: RoutingStep | None = None  # where decisions and losses are recorded (None: not recorded)
    mask_full: bool | None = None  # the whole mask is ones (known once per forward; None: each block checks)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (B, L, D) over positions where mask (B, L) is set; the plain mean without a mask.

    Written so that no (B, L, D) temporary is made: `sum`'s backward is a broadcast view that autograd adds
    in place into x's other gradient (`mean`'s would materialise it), and the masked sum is a batched
    matmul rather than x * mask."""
    if mask is None:
        return x.sum(dim=1) / x.shape[1]
    m = mask[:, -x.shape[1] :].to(x.dtype)
    return torch.bmm(m.unsqueeze(1), x).squeeze(1) / m.sum(dim=1, keepdim=True).clamp(min=1.0)


def match_rows(
    t: torch.Tensor | None,
    batch: int,
    what: str,
    block: str,
    device: torch.device | None = None,
    repeat: bool = True,
) -> torch.Tensor | None:
    """t on `device` with one row per example of the batch; with `repeat`, rows are repeated for beam search."""
    if t is None:
        return None
    if device is not None and t.device != device:
        t = t.to(device)
    if t.shape[0] == batch:
        return t
    if repeat and t.shape[0] > 0 and batch % t.shape[0] == 0:
        return t.repeat_interleave(batch // t.shape[0], dim=0)
    raise ValueError(
        f"{what} has {t.shape[0]} rows but block {block or '<unnamed>'} sees a batch of {batch}: give one row per "
        "example, in the same order as the batch."
    )


def select_tags(tags: torch.Tensor | None, group: int, block: str) -> torch.Tensor | None:
    """Validate the shape and dtype of routing tags and pick the block's tag group: (B,) or (B, G) -> (B,)."""
    if tags is None:
        return None
    if not isinstance(tags, torch.Tensor):
        tags = torch.as_tensor(tags)
    if tags.is_floating_point() or tags.dtype == torch.bool:
        raise ValueError(
            f"routing_tags must be an integer tensor (got dtype {tags.dtype}); pass a LongTensor of tag ids, -100 for "
            "unknown."
        )
    if tags.dim() == 1:
        return tags.long()
    if tags.dim() == 2:
        if not 0 <= group < tags.shape[1]:
            raise ValueError(
                f"routing_tags has {tags.shape[1]} tag groups but block {block or '<unnamed>'} uses tag_group={group}: "
                "set `tag_group` to a column of the tags."
            )
        return tags[:, group].long()
    raise ValueError(
        f"routing_tags must have shape (batch,) or (batch, groups), got {tuple(tags.shape)}. Pass one tag per "
        "example, or one per tag group."
    )


@dataclass
class RoutedRows:
    """One forward's rows: per example (rows = the examples, features their pooled inputs) or per token (rows = the
    non-padding tokens, `row_example` the example of each, `row_mask` where they sit in (batch, length))."""

    rows: torch.Tensor  # (R, T, D) what the bank runs on
    features: torch.Tensor  # (R, D') what the router sees
    keys: torch.Tensor | None  # (R,) hash keys
    batch: int
    length: int
    row_example: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None
    every_token: bool = False
    padding: torch.Tensor | None = None  # (R,) traced by torch.compile: rows that are padding, routed to no expert
    # eager, padded, per token: every position's features, keys and realness, so that a router taking `valid` sees
    # the traced path's rows (random routers then draw the same samples as under torch.compile)
    all_features: torch.Tensor | None = None  # (B*L, D)
    all_keys: torch.Tensor | None = None  # (B*L,)
    real: torch.Tensor | None = None  # (B*L,) bool


# every parameter and buffer of a block's router (network, REINFORCE baseline, BatchNorm statistics) has this in
# its name: the block holds its router as `self.router`
ROUTER_KEY = ".router."


def check_router_fits(router: Router, experts: ExpertBank, name: str) -> None:
    """A router and a bank can form a block: the same number of experts, and a bank that merges for a merging router."""
    if experts.num_experts != router.num_experts:
        raise ValueError(
            f"The router of block {name or '<unnamed>'} routes to {router.num_experts} experts but its bank has "
            f"{experts.num_experts}."
        )
    if router.merges_experts and not getattr(experts, "can_merge", False):
        raise ValueError(
            f"Router {router.name!r} of block {name or '<unnamed>'} averages its experts' parameters, but "
            f"{type(experts).__name__} cannot merge them (only banks of two-matmul experts can). Use another "
            "router with this bank."
        )


class RoutedBlock(nn.Module):
    """router + expert bank. forward(x, inputs) returns sum_j w_j f_{e_j}(x) with the shape of x except the last
    dimension (bank.out_features)."""

    def __init__(self, router: Router, experts: ExpertBank, granularity: str = "example", name: str = ""):
        super().__init__()
        check_router_fits(router, experts, name)
        self.router = router
        self.experts = experts
        self.granularity = granularity
        self.name = name
        self.record_key = name  # key of its records in a RoutingStep (the PEFT layer adds the adapter name)

    def forward(self, x: torch.Tensor, inputs: RoutingInputs | None = None) -> torch.Tensor:
        inputs = inputs or RoutingInputs()
        r = self.routed_rows(x, inputs)
        decision, weights = self.decide(self.router, self.record_key, r, inputs)
        return self.scatter(self.run_experts(self.router, r, decision, weights), r, x)

    # ----- the phases of a forward, shared with MultiGateBlock ------------------------------------------------
    def routed_rows(self, x: torch.Tensor, inputs: RoutingInputs) -> RoutedRows:
        """The rows the bank runs on and the routing features, keys and row bookkeeping the routers see."""
        seq = x if x.dim() == 3 else x.reshape(x.shape[0], 1, x.shape[-1])
        batch, length = seq.shape[0], seq.shape[1]
        name = self.name
        dev = x.device
        mask = match_rows(inputs.mask, batch, "attention_mask", name, dev)
        if self.granularity == "example":
            pooled = match_rows(inputs.pooled, batch, "the encoder's pooled output", name, dev)
            if inputs.keys is not None and inputs.keys.dim() != 1:
                raise ValueError(
                    f"routing_keys has shape {tuple(inputs.keys.shape)}, but block {name or '<unnamed>'} routes per "
                    "example: give one key per example, shape (batch,). (batch, tokens) keys are for "
                    "routing_granularity='token'."
                )
            return RoutedRows(
                rows=seq,
                features=pooled if pooled is not None else masked_mean(seq, mask),
                keys=match_rows(inputs.keys, batch, "routing_keys", name, dev),
                batch=batch,
                length=length,
            )
        row_mask = torch.ones(batch, length, dtype=torch.bool, device=dev) if mask is None else mask[:, -length:].bool()
        if inputs.keys is not None:  # a user's per-token keys replace the token ids
            token_ids = self._token_keys(inputs.keys, batch, length, dev)
        else:
            token_ids = match_rows(inputs.token_ids, batch, "input_ids", name, dev)
            token_ids = token_ids[:, -length:] if token_ids is not None else None
        # every token a row (no padding): views in token order, not a gather and a scatter of the whole sequence
        # traced by torch.compile: shapes may not depend on the mask, so every token is a row and padding rows get
        # no expert (see `decide`); eager: the padding rows are left out
        traced = torch.compiler.is_compiling()
        every_token = mask is None or bool(inputs.mask_full) or (not traced and bool(row_mask.all()))
        padding = ~row_mask.reshape(-1) if traced and not every_token else None
        if every_token or traced:
            # one token per example (decoding with the cache): row r is example r, which None says (no tensor)
            row_example = None if length == 1 else torch.arange(batch, device=dev).repeat_interleave(length)
            rows = seq.reshape(batch * length, 1, -1)  # (M, 1, D)
            keys = token_ids.reshape(-1) if token_ids is not None else None
        else:
            row_example = torch.arange(batch, device=dev).unsqueeze(1).expand(batch, length)[row_mask]
            rows = seq[row_mask].unsqueeze(1)
            keys = token_ids[row_mask] if token_ids is not None else None
            all_keys = token_ids.reshape(-1) if token_ids is not None else None
            return RoutedRows(
                rows, rows.squeeze(1), keys, batch, length, row_example, row_mask, False, None,
                all_features=seq.reshape(batch * length, -1), all_keys=all_keys, real=row_mask.reshape(-1),
            )  # fmt: skip
        return RoutedRows(rows, rows.squeeze(1), keys, batch, length, row_example, row_mask, True, padding)

    def decide(self, router: Router, record_key, r: RoutedRows, inputs: RoutingInputs):
        """router's decision on the rows, recorded under `record_key`; returns it and the combine weights (which
        carry the auxiliary losses' gradients in training)."""
        name = self.name
        tags = select_tags(inputs.tags, router.config.tag_group, name)
        tags = match_rows(tags, r.batch, "routing_tags", name, r.rows.device, repeat=False)
        row_tags = tags[r.row_example] if tags is not None and r.row_example is not None else tags
        supervised = router.learned and router.config.tag_supervision_coef > 0
        if tags is None and self.training and supervised:
            raise ValueError(
                f"Block {name or '<unnamed>'} has tag_supervision_coef > 0 but got no `routing_tags` in training: pass "
                "`routing_tags=` (-100 for examples without a tag), or set tag_supervision_coef=0."
            )
        # traced, padded: the router is told which rows are real (BatchNorm statistics, Expert Choice's picks)
        valid = None if r.padding is None else ~r.padding
        if valid is not None and not router.takes_valid:
            raise ValueError(
                f"Router {type(router).__name__} of block {name or '<unnamed>'} has no `valid` argument, which "
                "torch.compile needs on padded per-token batches (padding tokens stay rows; `valid` marks the real "
                "ones, for the BatchNorm statistics and the loss means). Add `valid=None` to its `forward` and "
                "`loss_terms` and pass it on to `compute_logits` and the base class's `loss_terms`, or compile with "
                "unpadded batches."
            )
        step_id = inputs.step.id if inputs.step else None
        if r.real is not None and router.takes_valid:
            # eager, padded: the router sees every position, as under torch.compile, and the real rows are kept
            # (the same decisions; a random router's samples are the traced path's, drawn for every position)
            all_tags = None if tags is None else tags.repeat_interleave(r.length)
            decision = router(r.all_features, tags=all_tags, keys=r.all_keys, step=step_id, valid=r.real)
            decision = _rows_of(decision, r.real)
        else:
            extra = {} if valid is None else {"valid": valid}
            decision = router(r.features, tags=row_tags, keys=r.keys, step=step_id, **extra)
        factor = router.config.expert_capacity_factor
        if r.padding is not None:  # traced, padded: padding rows choose no expert, so they add nothing
            pad = r.padding.unsqueeze(1)
            decision = replace(
                decision, experts=decision.experts.masked_fill(pad, -1), weights=decision.weights.masked_fill(pad, 0.0)
            )
        if factor is not None and router.capacity_applies():
            decision = limit_capacity(decision, router.num_experts, factor, None if valid is None else valid.sum())
        weights = decision.weights
        if inputs.step is not None:
            record = RoutingRecord(
                router=router,
                decision=_detached(decision),
                row_example=r.row_example,
                targets=router.tag_targets(row_tags) if row_tags is not None and supervised else None,
                batch_shape=(r.batch,) if r.row_mask is None else (r.batch, r.length),
                row_mask=r.row_mask,
                valid=valid,
            )
            if self.training:
                weights = inputs.step.attach(record_key, record, decision)
            else:
                inputs.step.record(record_key, record)
        return decision, weights

    def run_experts(self, router: Router, r: RoutedRows, decision: RoutingDecision, weights: torch.Tensor):
        bank_experts = router.bank_experts(decision.experts)  # router labels -> bank experts (local search)
        if router.merges_experts:  # SMEAR: the weights average the chosen experts' parameters
            return self.experts(r.rows, bank_experts, weights, merge=True)
        return self.experts(r.rows, bank_experts, weights)

    def scatter(self, out: torch.Tensor, r: RoutedRows, x: torch.Tensor) -> torch.Tensor:
        """The bank's row outputs back in x's layout (zeros at padding tokens)."""
        if r.row_mask is not None and not r.every_token:
            full = out.new_zeros(r.batch, r.length, out.shape[-1])
            full[r.row_mask] = out.squeeze(1)
            out = full
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _token_keys(self, keys: torch.Tensor, batch: int, length: int, device) -> torch.Tensor:
        """A user's per-token hash keys (B, L), which must match this block's tokens one for one."""
        name = self.name or "<unnamed>"
        if keys.dim() != 2 or keys.shape[1] != length:
            raise ValueError(
                f"routing_keys has shape {tuple(keys.shape)}, but block {name} routes each of its {length} tokens: "
                f"per-token routing needs one key per token, shape (batch, {length}). (batch,) keys are for "
                "routing_granularity='example'; when generating with the cache, feed input_ids instead of keys."
            )
        return match_rows(keys, batch, "routing_keys", name, device, repeat=False).long()


def _rows_of(d: RoutingDecision, rows: torch.Tensor) -> RoutingDecision:
    """The decision's rows where `rows` (bool, one per row) is set."""

    def pick(t):
        return None if t is None else t[rows]

    return RoutingDecision(
        experts=d.experts[rows], weights=d.weights[rows], probs=d.probs[rows], logits=pick(d.logits),
        baseline=pick(d.baseline), dropped=pick(d.dropped),
    )  # fmt: skip


def _detached(d: RoutingDecision) -> RoutingDecision:
    return RoutingDecision(
        experts=d.experts.detach(),
        weights=d.weights.detach(),
        probs=d.probs.detach(),
        logits=None if d.logits is None else d.logits.detach(),
        baseline=None if d.baseline is None else d.baseline.detach(),
        dropped=d.dropped,
    )
