"""One forward pass's routing: the decisions of every block and how their auxiliary losses reach the gradient.

Why gradients of auxiliary losses travel this way: a routed block may run inside reentrant gradient
checkpointing (its first forward has no graph) and REINFORCE's reward is only known after the whole forward.
So each block attaches its router's loss to the graph through its combine weights (`_AttachRoutingLoss`):
in the backward pass the loss is evaluated on the saved logits (and baseline), with the reward known by then,
and its gradient is scaled like the task loss. The scale is read by `_LossScaleProbe`, which wraps the
returned loss and sees the gradient the caller's backward gives it (1, 1/accumulation steps, an AMP scale).
The values themselves are added to the returned loss for reporting.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch

from ..routers.base import Router, RoutingDecision

_step_ids = itertools.count(1)


def _next_step_id() -> int | None:
    # traced by torch.compile: no id (a global counter read in the graph would be a guard that fails every forward)
    return None if torch.compiler.is_compiling() else next(_step_ids)


@dataclass
class RoutingRecord:
    """A block's decision in one forward, in routing rows, plus what its losses need."""

    router: Router
    decision: RoutingDecision  # rows; tensors detached
    row_example: torch.Tensor | None  # (R,) example of each row (None: row r is example r)
    targets: torch.Tensor | None  # (R,) tag-supervision targets (-100 unknown), or None
    batch_shape: tuple  # (B,) for per-example routing, (B, L) for per-token routing
    row_mask: torch.Tensor | None = None  # (B, L) rows' positions for per-token routing
    valid: torch.Tensor | None = None  # (R,) the real rows, where a traced padded batch keeps its padding as rows

    def loss_terms(self, logits: torch.Tensor, baseline: torch.Tensor | None, reward: torch.Tensor | None) -> dict:
        """The router's weighted auxiliary losses of this decision, means over its real rows."""
        experts = self.decision.requested_experts()
        # `valid` only with traced padding: a custom router need not know the argument otherwise
        extra = {} if self.valid is None else {"valid": self.valid}
        return self.router.loss_terms(logits, experts, baseline, self.targets, reward, **extra)

    def user_decision(self) -> RoutingDecision:
        """The decision shaped (batch, k) or (batch, tokens, k); padding tokens have expert -1 and weight 0."""
        d = self.decision
        if self.row_mask is None:
            return d
        b, length = self.batch_shape
        every_position = d.experts.shape[0] == b * length  # a traced forward routes padding too (to no expert)

        def scatter(t: torch.Tensor | None, fill: float) -> torch.Tensor | None:
            if t is None:
                return None
            if every_position:
                t = t.view(b, length, *t.shape[1:])
                return t.masked_fill(~self.row_mask.view(b, length, *[1] * (t.dim() - 2)), fill)
            out = t.new_full((b, length, *t.shape[1:]), fill)
            out[self.row_mask] = t
            return out

        return RoutingDecision(
            experts=scatter(d.experts, -1),
            weights=scatter(d.weights, 0.0),
            probs=scatter(d.probs, 0.0),
            logits=scatter(d.logits, 0.0),
            baseline=scatter(d.baseline, 0.0),
            dropped=scatter(d.dropped, -1),
        )


@dataclass
class RoutingStep:
    """Routing of one forward pass: records by block, the reward and the loss scale of its backward."""

    id: int | None = field(default_factory=_next_step_id)
    records: dict = field(default_factory=dict)
    reward: torch.Tensor | None = None  # (B,) minus each example's task loss
    loss_scale: torch.Tensor | None = None
    loss_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # under torch.compile: name -> (logits, baseline) still in the graph, whose losses join the returned loss directly
    live: dict = field(default_factory=dict)
    _warned_scale: bool = False

    def set_reward(self, per_example_loss: torch.Tensor) -> None:
        """REINFORCE's reward: minus each example's own task loss (detached)."""
        self.reward = -per_example_loss.detach().float().reshape(-1)

    def rows_reward(self, record: RoutingRecord) -> torch.Tensor | None:
        if self.reward is None:
            return None
        reward = self.reward.to(record.decision.experts.device)
        return reward if record.row_example is None else reward[record.row_example]

    @property
    def needs_reward(self) -> bool:
        return any(r.router.needs_reward for r in self.records.values())

    def record(self, name, record: RoutingRecord) -> None:
        self.records[name] = record

    def attach(self, name, record: RoutingRecord, decision: RoutingDecision) -> torch.Tensor:
        """Record a block's decision; return its weights joined to the graph of its auxiliary losses."""
        self.record(name, record)
        router = record.router
        if not router.loss_coefficients() or decision.logits is None or not torch.is_grad_enabled():
            return decision.weights
        if not decision.logits.requires_grad and (decision.baseline is None or not decision.baseline.requires_grad):
            return decision.weights
        if torch.compiler.is_compiling():
            # a backward that reads state set after the forward cannot be traced: the losses are added to the
            # returned loss as ordinary terms instead (the same values and gradients; see `add_to_loss`)
            self.live[name] = (decision.logits, decision.baseline)
            return decision.weights

        def loss_fn(logits: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor | None:
            reward = self.rows_reward(record)
            if router.needs_reward and reward is None:
                raise RuntimeError(
                    f"The REINFORCE router of block {name} needs a reward before backward(): the forward got no "
                    "`labels`, so no per-example task loss was computed. Pass `labels` to the forward, or call "
                    "`hf_condroute.set_reward(model, per_example_loss)` before backward()."
                )
            terms = record.loss_terms(logits, baseline, reward)
            if not terms:
                return None
            return sum(terms.values()) * self.scale_for_backward()

        return _AttachRoutingLoss.apply(decision.weights, decision.logits, decision.baseline, loss_fn)

    def scale_for_backward(self) -> torch.Tensor | float:
        if self.loss_scale is None:
            if not self._warned_scale:
                warnings.warn(
                    "Routing auxiliary losses were not part of the loss you called backward() on, so their "
                    "gradients were added with weight 1. Use `outputs.loss`, or add `hf_condroute.routing_loss(model)` "
                    "to your own loss, so they are scaled like it.",
                    stacklevel=2,
                )
                self._warned_scale = True
            return 1.0
        return self.loss_scale

    def compute_loss_values(self) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of this step, summed over blocks, for reporting and for the returned loss."""
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # a context, not a decorator: torch.compile cannot trace a decorated method
            for record in self.records.values():
                d = record.decision
                if d.logits is None or not record.router.loss_coefficients():
                    continue
                reward = self.rows_reward(record)
                terms = record.loss_terms(d.logits, d.baseline, reward)
                for key, value in terms.items():
                    values[key] = values.get(key, 0.0) + value.detach().float()
        self.loss_values = values
        return values

    def live_loss(self) -> torch.Tensor | None:
        """The auxiliary losses of the blocks traced by torch.compile, differentiable, summed; None without any.
        Their detached values become `loss_values`."""
        total, values = None, {}
        for name, (logits, baseline) in self.live.items():
            record = self.records[name]
            reward = self.rows_reward(record)
            terms = record.loss_terms(logits, baseline, reward)
            for key, value in terms.items():
                values[key] = values.get(key, 0.0) + value.detach().float()
                total = value if total is None else total + value
        if total is not None:
            self.loss_values = values
        return total

    def total_loss_value(self) -> torch.Tensor | None:
        values = self.compute_loss_values()
        return sum(values.values()) if values else None

    def add_to_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus this step's auxiliary loss values, wrapped so backward() learns its scale."""
        live = self.live_loss()
        if live is not None:  # traced: ordinary terms, scaled by backward() like the loss itself
            return loss + live.to(loss.device, loss.dtype)
        total = self.total_loss_value()
        if total is not None:
            loss = loss + total.to(loss.device, loss.dtype)
        # traced: no block attached a loss to its weights (`attach`), so no backward needs the scale
        probe = loss.requires_grad and not torch.compiler.is_compiling()
        return _LossScaleProbe.apply(loss, self) if probe else loss

    def loss(self, device=None) -> torch.Tensor:
        """This step's auxiliary losses as a scalar to add to a loss of your own."""
        live = self.live_loss()
        if live is not None:
            return live.float().to(device) if device is not None else live.float()
        total = self.total_loss_value()
        anchor = torch.zeros((), device=device, requires_grad=True)
        value = anchor if total is None else anchor + total.to(anchor.device)
        return value if torch.compiler.is_compiling() else _LossScaleProbe.apply(value, self)


class _AttachRoutingLoss(torch.autograd.Function):
    """Identity on the combine weights; in backward, adds the gradient of loss_fn(logits, baseline)."""

    @staticmethod
    def forward(ctx, weights, logits, baseline, loss_fn):
        ctx.loss_fn = loss_fn
        ctx.has_baseline = baseline is not None
        ctx.save_for_backward(logits, baseline if baseline is not None else torch.empty(0))
        return weights.clone()  # a clone, not a view: callers may modify it in place

    @staticmethod
    def backward(ctx, grad_weights):
        logits, baseline = ctx.saved_tensors
        leaves = [logits.detach().requires_grad_()]
        if ctx.has_baseline:
            leaves.append(baseline.detach().requires_grad_())
        with torch.enable_grad():
            loss = ctx.loss_fn(leaves[0], leaves[1] if ctx.has_baseline else None)
        if loss is None:
            return grad_weights, None, None, None
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grad_baseline = grads[1] if ctx.has_baseline else None
        return grad_weights, grads[0], grad_baseline, None


class _LossScaleProbe(torch.autograd.Function):
    """Identity on the loss; its backward stores the gradient it receives as the step's loss scale."""

    @staticmethod
    def forward(ctx, loss, step):
        ctx.step = step
        return loss.clone()  # a clone, not a view: Trainer scales the loss in place

    @staticmethod
    def backward(ctx, grad):
        ctx.step.loss_scale = grad.detach()
        return grad, None
