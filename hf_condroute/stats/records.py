"""What routing statistics hold: per block (`BlockStats`) and per split (`RoutingStats`), as written to
`routing_stats.json`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import metrics


@dataclass
class BlockStats:
    """One block's routing over the accumulated rows (examples, or tokens for per-token routing)."""

    num_experts: int
    counts: list[float]  # assignments per expert; top-k routing counts each row k times
    rows: int  # routed rows (padding excluded)
    probs_entropy: float | None = None  # mean normalised entropy of the router's distribution per row
    top_k: int = 1
    router: str | None = None
    learned: bool | None = None
    granularity: str | None = None
    dropped: float | None = None  # assignments over capacity (`expert_capacity_factor`); None: no capacity limit

    @property
    def dropped_fraction(self) -> float | None:
        """Share of the router's assignments dropped for being over capacity (`counts` are those that ran)."""
        if self.dropped is None:
            return None
        asked = sum(self.counts) + self.dropped
        return self.dropped / asked if asked > 0 else 0.0

    @property
    def load(self) -> list[float]:
        return metrics.expert_load(torch.tensor(self.counts)).tolist()

    @property
    def load_entropy(self) -> float:
        return metrics.normalized_entropy(torch.tensor(self.load))

    @property
    def max_share(self) -> float:
        return metrics.max_share(torch.tensor(self.counts))

    @property
    def experts_used(self) -> float:
        return metrics.fraction_used(torch.tensor(self.counts))

    @property
    def top_k_share(self) -> float:
        """Share of assignments taken by the k busiest experts: 1 when the block always picks the same k."""
        load = sorted(self.load, reverse=True)
        return float(sum(load[: self.top_k]))

    def can_collapse(self) -> bool:
        """A learned router with more experts than it picks per row (heuristic routing is fixed by design)."""
        return self.learned is not False and self.num_experts > self.top_k

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            load=self.load, load_entropy=self.load_entropy, max_share=self.max_share, experts_used=self.experts_used
        )
        if self.dropped is None:
            del out["dropped"]
        else:
            out["dropped_fraction"] = self.dropped_fraction
        return out

    @classmethod
    def from_dict(cls, d: dict) -> BlockStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class RoutingStats:
    """Routing statistics of one adapter over a split: per block, and Focus/Cover when tags were seen."""

    split: str
    examples: int
    blocks: dict[str, BlockStats]
    global_step: int | None = None
    focus: float | None = None
    cover: float | None = None
    alignment: list[list[float]] | None = None  # (tags, subnetworks) F1 matrix
    tag_labels: list[str] | None = None
    subnetwork_labels: list[str] | None = None
    tag_counts: list[float] | None = None  # examples with each tag
    flip_rate: float | None = None  # against the previous evaluation of the same examples
    aux_losses: dict[str, float] = field(default_factory=dict)  # mean weighted auxiliary losses per step

    def summary(self) -> dict[str, float]:
        """A bounded set of numbers: means and worst cases over blocks, plus Focus/Cover and losses when known."""
        blocks = list(self.blocks.values())
        out: dict[str, float] = {}
        if blocks:
            out["load_entropy"] = sum(b.load_entropy for b in blocks) / len(blocks)
            out["max_share"] = max(b.max_share for b in blocks)
            out["experts_used"] = min(b.experts_used for b in blocks)
            entropies = [b.probs_entropy for b in blocks if b.probs_entropy is not None]
            if entropies:
                out["router_entropy"] = sum(entropies) / len(entropies)
            limited = [b for b in blocks if b.dropped is not None]
            if limited:  # over every limited block's assignments
                asked = sum(sum(b.counts) + b.dropped for b in limited)
                out["dropped_fraction"] = sum(b.dropped for b in limited) / asked if asked > 0 else 0.0
        for name in ("focus", "cover", "flip_rate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name, value in self.aux_losses.items():
            out[f"loss_{name}"] = value
        return out

    def collapsed(self, threshold: float) -> dict[str, float]:
        """{block: share of its k busiest experts} for learned blocks where that share is >= threshold."""
        return {
            name: b.top_k_share for name, b in self.blocks.items() if b.can_collapse() and b.top_k_share >= threshold
        }

    def to_dict(self) -> dict:
        out = asdict(self)
        out["blocks"] = {name: b.to_dict() for name, b in self.blocks.items()}
        out["summary"] = self.summary()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RoutingStats:
        kwargs = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kwargs["blocks"] = {name: BlockStats.from_dict(b) for name, b in d.get("blocks", {}).items()}
        return cls(**kwargs)


def tag_labels(tags_per_group: Sequence[int], tag_names: Sequence[str] | None = None) -> list[str]:
    """Column names of the tag matrix: `tag_names` when given, "t" for one group, "g:t" for several."""
    total = sum(tags_per_group)
    if tag_names is not None:
        if len(tag_names) < total:
            raise ValueError(f"tag_names has {len(tag_names)} names but there are {total} tags: name every tag.")
        return [str(n) for n in tag_names[:total]]
    if len(tags_per_group) == 1:
        return [str(t) for t in range(total)]
    return [f"{g}:{t}" for g, size in enumerate(tags_per_group) for t in range(size)]
