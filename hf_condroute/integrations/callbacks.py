"""`RoutingStatsCallback`: routing statistics in the Trainer's own logs, and a warning when a block collapses.

During training it adds up every forward's decisions (each gradient-accumulation micro-batch) and auxiliary
losses, on the device and without synchronising; at each logging step it adds a few summary numbers to the
Trainer's logs: `routing_load_entropy` (mean over blocks), `routing_max_share` (worst block),
`routing_experts_used` (worst block), `routing_router_entropy`, `routing_loss_<name>` per auxiliary loss and,
with `expert_capacity_factor`, `routing_dropped_fraction` (assignments over capacity, of all the routers asked for).
During evaluation it collects the decisions and `routing_tags` of every prediction step and adds
`eval_routing_focus`, `eval_routing_cover`, `eval_routing_flip_rate` (against the previous evaluation) and the
same load numbers. Under torch.distributed the sums of every process are merged before anything is reported.
The latest statistics are kept on the model, so `save_pretrained` (and every Trainer checkpoint) writes them
to `routing_stats.json`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import fields

from accelerate.state import GradientState, PartialState
from transformers import DefaultFlowCallback, TrainerCallback

from ..block.api import _active_adapter, _state, block_name, get_routing, last_step
from ..block.context import ModelRoutingState
from ..routers.base import RoutingDecision
from ..stats import RoutingStats, RoutingStatsAccumulator, set_routing_stats

PREFIX = "routing_"


class RoutingStatsCallback(TrainerCallback):
    """Logs routing statistics through the Trainer's logging (TensorBoard, trackio, wandb, ...).

    Args:
        collapse_threshold: warn (once per block) when a learned block's k busiest experts take at least this
            share of its assignments.
        tags_per_group: tags in each tag group of `routing_tags` (e.g. 8 for DAE-Syn's 4 x 8); None: the largest
            tag seen + 1. Sets the columns of the alignment matrix and so Cover.
        tag_names: names of the tags in column order (e.g. the GLUE task names), for `routing_stats.json`.
        per_block: also log each block's max share and load entropy (one key per block).
        flip_rate: keep each evaluation's decisions (compactly, on the CPU) to report how many changed since
            the previous evaluation of the same data.

    Reporting integrations only see what is in the logs when they are called, so add it with
    `RoutingStatsCallback(...).attach(trainer)`, which puts it before them; `Trainer(callbacks=[...])` puts it
    after them (the console, `trainer.state.log_history` and checkpoints still get everything).
    """

    def __init__(
        self,
        collapse_threshold: float = 0.9,
        tags_per_group: int | Sequence[int] | None = None,
        tag_names: Sequence[str] | None = None,
        per_block: bool = False,
        flip_rate: bool = True,
    ):
        if not 0 < collapse_threshold <= 1:
            raise ValueError(f"collapse_threshold is a share of assignments in (0, 1], got {collapse_threshold}.")
        self.collapse_threshold = collapse_threshold
        self.tags_per_group = tags_per_group
        self.tag_names = tag_names
        self.per_block = per_block
        self.flip_rate = flip_rate
        self._attached = False
        self._warned_blocks: set[str] = set()
        self._train = RoutingStatsAccumulator()
        self._eval = self._new_eval()
        self._previous_decisions: dict[str, dict] = {}
        self._seen_step = None  # the RoutingStep last counted

    def attach(self, trainer) -> RoutingStatsCallback:
        """Add this callback to `trainer` right after its `DefaultFlowCallback`, before the reporting
        integrations, so they log the routing metrics too."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        callbacks.insert(flow + 1, self)
        self._attached = True
        return self

    def _new_eval(self) -> RoutingStatsAccumulator:
        return RoutingStatsAccumulator(self.tags_per_group, self.tag_names, keep_decisions=self.flip_rate)

    # ----- collecting ----------------------------------------------------------------------------------
    def _new_forward(self, model) -> bool:
        """True once per forward: the same step is never counted twice."""
        state = ModelRoutingState.find(model) if model is not None else None
        # the step itself, not its id: a forward traced by torch.compile has none
        if state is None or state.step is None or state.step is self._seen_step:
            return False
        self._seen_step = state.step
        return True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("RoutingStatsCallback needs the Trainer's model: it was called without one.")
        _state(model)  # a clear error for a model without routed layers
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._attached and state.is_world_process_zero:
            warnings.warn(
                f"RoutingStatsCallback runs after the reporting callbacks ({', '.join(reporters)}), so they will not "
                "log the routing metrics. Add it with `RoutingStatsCallback(...).attach(trainer)` instead of "
                "`Trainer(callbacks=[...])`.",
                stacklevel=2,
            )
        self._train.reset()

    def _collect_train(self, model) -> None:
        if not self._new_forward(model):
            return
        # the routing rows as recorded: scattering per-token decisions back to (batch, tokens) would make the
        # device wait at every step
        step = last_step(model)
        adapter = _active_adapter(model, None)
        rows, examples = {}, None
        for key, record in step.records.items():
            name = block_name(key, adapter)
            if name is not None:
                rows[name] = record.decision
                examples = record.batch_shape[0]
        self._train.update(rows, losses=step.loss_values or None, examples=examples)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect_train(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect_train(model)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if not self._new_forward(model):
            return
        routing = get_routing(model)
        if not routing:
            return  # a forward that routed nothing, e.g. under `disable_adapter()`
        tags = ModelRoutingState.find(model).tags
        if tags is not None and tags.shape[0] != next(iter(routing.values())).experts.shape[0]:
            tags = None  # decisions of a generate() step: beams repeat examples
        real = _without_padding(routing, tags)
        if real is not None:
            self._eval.update(*real)

    # ----- reporting -----------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        # Only the Trainer's own training and evaluation logs, which every rank makes at the same point: the merges
        # below are collective. Other logs (e.g. a user's trainer.log on one rank) are left alone.
        eval_prefix = _eval_prefix(logs)
        if eval_prefix is not None:
            stats = self._finish_eval(state, model, eval_prefix)
        elif "loss" in logs and "learning_rate" in logs:
            stats = self._finish(self._train, "train", state, model)
            self._train.reset()
        else:
            return
        if stats is None:
            return
        added = self._report(stats, state, f"{eval_prefix}_" if eval_prefix else "")
        original = dict(logs)
        logs.update(added)
        history = state.log_history[-1] if state.log_history else None
        if (
            history is not None
            and history.get("step") == state.global_step
            and all(history.get(k) == v for k, v in original.items())
        ):
            history.update(added)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # evaluation that did not log (e.g. a custom loop): still keep its statistics for the checkpoint
        if not self._eval.empty and model is not None:
            stats = self._finish_eval(state, model, "eval")
            if stats is not None:
                self._report(stats, state, "eval_")

    def on_predict(self, args, state, control, **kwargs):
        self._eval = self._new_eval()

    def _finish_eval(self, state, model, prefix: str) -> RoutingStats | None:
        acc, self._eval = self._eval, self._new_eval()
        if self.flip_rate and not acc.empty:
            acc.compare_decisions(self._previous_decisions.get(prefix, {}))
            self._previous_decisions[prefix] = acc.decisions
        return self._finish(acc, prefix, state, model)

    def _finish(self, acc: RoutingStatsAccumulator, split: str, state, model) -> RoutingStats | None:
        """Merge the processes' sums; the statistics (kept on the model), or None when no process saw a batch."""
        acc.merge_processes()
        if acc.empty:
            return None
        stats = acc.compute(split, state.global_step, model=model)
        set_routing_stats(model, stats)
        return stats

    def _report(self, stats: RoutingStats, state, prefix: str) -> dict[str, float]:
        collapsed = stats.collapsed(self.collapse_threshold)
        new = {name: share for name, share in collapsed.items() if name not in self._warned_blocks}
        if new and state.is_world_process_zero:
            details = "; ".join(
                f"{name}: its top-{stats.blocks[name].top_k} expert(s) took {share:.0%}" for name, share in new.items()
            )
            warnings.warn(
                f"Routing collapse at step {state.global_step} ({stats.split}) in {len(new)} block(s): {details} of "
                f"the assignments (threshold {self.collapse_threshold:.0%}). The other experts get almost no data and "
                "no training. Consider `router_aux_loss_coef` (load balancing), `router_jitter_noise`, a higher "
                "`router_temperature` or tag supervision; `RoutingStatsCallback(collapse_threshold=...)` changes the "
                "threshold. Warned once per block.",
                stacklevel=2,
            )
        self._warned_blocks.update(new)
        out = {f"{prefix}{PREFIX}{k}": round(v, 6) for k, v in stats.summary().items()}
        out[f"{prefix}{PREFIX}collapsed_blocks"] = len(collapsed)
        if self.per_block:
            for name, b in stats.blocks.items():
                out[f"{prefix}{PREFIX}max_share/{name}"] = round(b.max_share, 6)
                out[f"{prefix}{PREFIX}load_entropy/{name}"] = round(b.load_entropy, 6)
        return out


def _without_padding(routing: dict, tags):
    """Drop the examples accelerate repeats so that every process gets a full last evaluation batch (the
    Trainer drops them from predictions with `gather_for_metrics`); without this, multi-process evaluation
    counts them twice. The last global batch holds `remainder` real examples, rank 0's first. None when this
    process's batch holds only repeats."""
    state, gradient_state = PartialState(), GradientState()
    if state.num_processes == 1 or not gradient_state.end_of_dataloader or gradient_state.remainder <= 0:
        return routing, tags
    batch = next(iter(routing.values())).experts.shape[0]
    keep = max(0, min(batch, gradient_state.remainder - state.process_index * batch))
    if keep == 0:
        return None
    if keep == batch:
        return routing, tags
    trimmed = {
        name: RoutingDecision(
            **{f.name: None if getattr(d, f.name) is None else getattr(d, f.name)[:keep] for f in fields(d)}
        )
        for name, d in routing.items()
    }
    return trimmed, None if tags is None else tags[:keep]


def _eval_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's logs ("eval", "eval_<name>"), from its `<prefix>_runtime` key;
    None for training logs (including the final `train_runtime` summary)."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("_runtime")]
    return None
