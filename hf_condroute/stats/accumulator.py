"""`RoutingStatsAccumulator`: sums of routing decisions (and tags, and auxiliary losses) that add up exactly over
batches and processes, so memory does not grow with the data and `merge_processes()` makes every rank hold the
statistics of the whole (distributed) run; `compute()` turns them into a `RoutingStats`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import metrics
from .metrics import Routing
from .records import BlockStats, RoutingStats, tag_labels
from .store import block_info


class _GroupCounts:
    """Sums behind the F1 matrix for one tag group; its number of tags grows as larger tag values appear."""

    def __init__(self, num_tags: int, num_subnetworks: int, device):
        self.both = torch.zeros(num_tags, num_subnetworks, dtype=torch.float64, device=device)
        self.tag_count = torch.zeros(num_tags, dtype=torch.float64, device=device)
        self.known_active = torch.zeros(num_subnetworks, dtype=torch.float64, device=device)

    def grow(self, num_tags: int) -> None:
        extra = num_tags - self.both.shape[0]
        if extra > 0:
            self.both = torch.cat([self.both, self.both.new_zeros(extra, self.both.shape[1])])
            self.tag_count = torch.cat([self.tag_count, self.tag_count.new_zeros(extra)])

    def add(self, other: _GroupCounts) -> None:
        self.grow(other.both.shape[0])
        other.grow(self.both.shape[0])
        self.both += other.both.to(self.both.device)
        self.tag_count += other.tag_count.to(self.both.device)
        self.known_active += other.known_active.to(self.both.device)


class RoutingStatsAccumulator:
    """Adds up routing decisions (and tags, and auxiliary losses) over batches.

    Args:
        tags_per_group: tags in each tag group (one int for every group); None: the largest tag seen + 1.
        tag_names: names of the tags (in column order) for the alignment matrix.
        keep_decisions: keep every decision (compactly, on the CPU) to compute the flip rate against another
            evaluation of the same examples.
    """

    def __init__(
        self,
        tags_per_group: int | Sequence[int] | None = None,
        tag_names: Sequence[str] | None = None,
        keep_decisions: bool = False,
    ):
        self.tags_per_group = tags_per_group
        self.tag_names = list(tag_names) if tag_names is not None else None
        self.keep_decisions = keep_decisions
        self.reset()

    def reset(self) -> None:
        self.examples = 0
        self.blocks: dict[str, dict] = {}
        self.groups: list[_GroupCounts] | None = None
        self.subnetwork_labels: list[str] | None = None
        self.fixed_sizes: list[int] | None = None
        self.loss_sums: dict[str, float] = {}
        self.loss_steps = 0
        self.decisions: dict[str, list[torch.Tensor]] = {}
        self.flips: tuple[int, int] | None = None
        self._pending_losses: list[dict[str, torch.Tensor]] = []

    @property
    def empty(self) -> bool:
        return self.examples == 0

    # ----- adding batches ---------------------------------------------------------------------------
    def update(
        self,
        routing: Routing,
        tags: torch.Tensor | None = None,
        losses: dict | None = None,
        examples: int | None = None,
    ) -> None:
        """Add one forward's decisions ({block: RoutingDecision}), optionally its tags ((B,) or (B, G)) and its
        weighted auxiliary losses ({name: scalar tensor}). Decisions may also be routing rows (R, k), e.g. the
        non-padding tokens only, when `examples` gives the batch size (load and entropy need no example shape)."""
        if not routing:
            return
        batch = examples if examples is not None else next(iter(routing.values())).experts.shape[0]
        for name, d in routing.items():
            n = d.probs.shape[-1]
            b = self.blocks.get(name)
            if b is None:
                device = d.experts.device
                b = self.blocks[name] = {
                    "num_experts": n,
                    "top_k": d.experts.shape[-1],
                    "counts": torch.zeros(n, dtype=torch.float64, device=device),
                    "rows": torch.zeros((), dtype=torch.float64, device=device),
                    "entropy": torch.zeros((), dtype=torch.float64, device=device),
                }
            routed = (d.requested_experts() >= 0).any(-1)  # a row whose every assignment was dropped still counts
            b["counts"] += metrics.expert_counts(d.experts, n, check=False).to(b["counts"].device)
            if d.dropped is not None:
                dropped = (d.dropped >= 0).sum().to(b["counts"].device, torch.float64)
                b["dropped"] = b.get("dropped", 0) + dropped
            b["rows"] += routed.sum().to(b["rows"].device, torch.float64)
            b["entropy"] += _probs_entropy_sum(d.probs, routed).to(b["entropy"].device)
            if self.keep_decisions:
                self.decisions.setdefault(name, []).append(_compact(d.experts))
        if tags is not None:
            self._add_tags(routing, tags, batch)
        if losses:
            self._pending_losses.append({k: v.detach() for k, v in losses.items()})
            self.loss_steps += 1
        self.examples += batch

    def _add_tags(self, routing: Routing, tags: torch.Tensor, batch: int) -> None:
        tags = torch.as_tensor(tags)
        if tags.shape[0] != batch:
            raise ValueError(
                f"routing_tags has {tags.shape[0]} rows but the routing covers {batch} examples: the tags must be "
                "those of the routed batch (generation with beams repeats examples; compute statistics on a plain "
                "forward)."
            )
        groups = 1 if tags.dim() == 1 else tags.shape[1]
        if self.fixed_sizes is None and self.tags_per_group is not None:
            self.fixed_sizes = (
                [self.tags_per_group] * groups if isinstance(self.tags_per_group, int) else list(self.tags_per_group)
            )
            if len(self.fixed_sizes) != groups:
                raise ValueError(
                    f"routing_tags have {groups} tag groups but tags_per_group gives {len(self.fixed_sizes)} sizes: "
                    "give one per group (or one int for all)."
                )
        active = metrics.active_subnetworks(routing).to(torch.float64)
        cols = tags.reshape(batch, groups)
        if self.groups is None:
            self.groups = [_GroupCounts(0, active.shape[1], active.device) for _ in range(groups)]
            self.subnetwork_labels = metrics.subnetwork_labels(routing)
        elif len(self.groups) != groups:
            raise ValueError(f"routing_tags changed from {len(self.groups)} tag groups to {groups} between batches.")
        for g in range(groups):
            size = self.fixed_sizes[g] if self.fixed_sizes is not None else None
            present = metrics.tag_presence(cols[:, g], size)[0].double()
            known = (cols[:, g] != metrics.UNKNOWN_TAG).cpu().double()
            counts = self.groups[g]
            counts.grow(present.shape[1])
            t = present.shape[1]
            counts.both[:t] += present.T @ active
            counts.tag_count[:t] += present.sum(0)
            counts.known_active += known @ active

    # ----- flip rate ----------------------------------------------------------------------------------
    def compare_decisions(self, previous: dict[str, list[torch.Tensor]]) -> None:
        """Count rows whose experts changed since `previous` (another accumulator's `decisions` over the same
        examples, in the same order and batches). Leaves the flip rate unknown when they do not line up."""
        flipped = routed = 0
        if not previous or list(previous) != list(self.decisions):
            return
        for name, batches in self.decisions.items():
            before = previous[name]
            if len(before) != len(batches) or any(a.shape != b.shape for a, b in zip(before, batches)):
                return
            for a, b in zip(before, batches):
                f, r = metrics.flip_counts(a, b)
                flipped, routed = flipped + f, routed + r
        self.flips = (flipped, routed)

    # ----- processes ---------------------------------------------------------------------------------
    def _flush_losses(self) -> None:
        for step in self._pending_losses:
            for k, v in step.items():
                self.loss_sums[k] = self.loss_sums.get(k, 0.0) + float(v)
        self._pending_losses.clear()

    def state(self) -> dict:
        """Everything that adds up, on the CPU."""
        self._flush_losses()
        return {
            "examples": self.examples,
            "blocks": {
                n: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for n, b in self.blocks.items()
            },
            "groups": None
            if self.groups is None
            else [(g.both.cpu(), g.tag_count.cpu(), g.known_active.cpu()) for g in self.groups],
            "subnetwork_labels": self.subnetwork_labels,
            "loss_sums": dict(self.loss_sums),
            "loss_steps": self.loss_steps,
            "flips": self.flips,
        }

    def merge_processes(self) -> None:
        """Sum the statistics of every process (torch.distributed), so every rank holds those of all the data.
        Call it on every rank; without an initialised process group of several processes it does nothing."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        self.reset()
        for s in states:
            self._add_state(s)

    def _add_state(self, s: dict) -> None:
        self.examples += s["examples"]
        for name, b in s["blocks"].items():
            mine = self.blocks.get(name)
            if mine is None:
                self.blocks[name] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}
            else:
                for k in ("counts", "rows", "entropy"):
                    mine[k] = mine[k] + b[k]
                if "dropped" in b:
                    mine["dropped"] = mine.get("dropped", 0) + b["dropped"]
        if s["groups"] is not None:
            if self.groups is None:
                c = s["groups"][0][2].shape[0]
                self.groups = [_GroupCounts(0, c, "cpu") for _ in s["groups"]]
                self.subnetwork_labels = s["subnetwork_labels"]
            for mine, (both, tag_count, known_active) in zip(self.groups, s["groups"]):
                other = _GroupCounts(0, both.shape[1], "cpu")
                other.both, other.tag_count, other.known_active = both, tag_count, known_active
                mine.add(other)
        for k, v in s["loss_sums"].items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + v
        self.loss_steps += s["loss_steps"]
        if s["flips"] is not None:
            f, r = self.flips or (0, 0)
            self.flips = (f + s["flips"][0], r + s["flips"][1])

    # ----- result ------------------------------------------------------------------------------------
    def compute(
        self,
        split: str,
        global_step: int | None = None,
        model: nn.Module | None = None,
        adapter_name: str | None = None,
    ) -> RoutingStats:
        """The statistics so far. With `model`, each block also names its router."""
        self._flush_losses()
        info = block_info(model, adapter_name) if model is not None else {}
        blocks = {}
        for name, b in self.blocks.items():
            rows = float(b["rows"])
            blocks[name] = BlockStats(
                num_experts=b["num_experts"],
                counts=b["counts"].cpu().tolist(),
                rows=int(rows),
                probs_entropy=float(b["entropy"]) / rows if rows > 0 else None,
                top_k=b["top_k"],
                dropped=float(b["dropped"]) if "dropped" in b else None,
                **info.get(name, {}),
            )
        stats = RoutingStats(split=split, examples=self.examples, blocks=blocks, global_step=global_step)
        if self.groups is not None and self.examples:
            both = torch.cat([g.both.cpu() for g in self.groups])
            tag_count = torch.cat([g.tag_count.cpu() for g in self.groups])
            active_count = torch.cat([g.known_active.cpu().expand(g.both.shape[0], -1) for g in self.groups])
            alignment = metrics.alignment_from_counts(both, tag_count, active_count)
            if alignment.numel():
                stats.focus, stats.cover = metrics.focus_cover_scores(alignment)
                stats.alignment = alignment.tolist()
                stats.tag_labels = tag_labels([g.both.shape[0] for g in self.groups], self.tag_names)
                stats.subnetwork_labels = list(self.subnetwork_labels)
                stats.tag_counts = tag_count.tolist()
        if self.loss_steps:
            stats.aux_losses = {k: v / self.loss_steps for k, v in self.loss_sums.items()}
        if self.flips is not None and self.flips[1] > 0:
            stats.flip_rate = self.flips[0] / self.flips[1]
        return stats


def _probs_entropy_sum(probs: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    n = probs.shape[-1]
    if n == 1:
        return routed.sum().double()
    p = probs.double()
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(-1) / torch.log(torch.tensor(float(n), dtype=torch.float64))
    return (h * routed).sum()


def _compact(experts: torch.Tensor) -> torch.Tensor:
    dtype = torch.int16 if experts.numel() == 0 or int(experts.max()) < 2**15 else torch.int32
    return experts.detach().to("cpu", dtype)
