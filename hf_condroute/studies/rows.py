"""The rows of paper A's studies (DAE-Syn, Res-Dom): a router alone, with tag supervision on a percentage of the
training examples (`router+sup10`), or with experts initialised from a tag-routing run (`router+init`); and the
standard error the studies report over seeds. Each study subclasses `StudyRow` with its name and router lists."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

HEURISTIC_ROUTERS = ("tag", "hash", "monolithic")
SUPERVISION_PERCENTS = (1, 10, 100)


@dataclass(frozen=True)
class StudyRow:
    """One row of a study: `router`, `router+sup<percent>` or `router+init`."""

    study: ClassVar[str] = ""
    heuristic_routers: ClassVar[tuple[str, ...]] = HEURISTIC_ROUTERS
    learned_routers: ClassVar[tuple[str, ...]] = ()  # tag supervision and subnet init apply to these

    router: str
    supervision_percent: int = 0  # training examples whose tags supervise the routers, in percent
    subnet_init: bool = False  # experts start from this seed's tag-routing model

    def __post_init__(self):
        routers = self.heuristic_routers + self.learned_routers
        if self.router not in routers:
            raise ValueError(f"Unknown {self.study} router {self.router!r}: choose one of {', '.join(routers)}.")
        if (self.supervision_percent or self.subnet_init) and self.router not in self.learned_routers:
            raise ValueError(
                f"Tag supervision and subnet init apply to learned routers ({', '.join(self.learned_routers)}), not "
                f"{self.router!r}."
            )
        if not 0 <= self.supervision_percent <= 100:
            raise ValueError(f"supervision_percent must be in 0..100, got {self.supervision_percent}.")
        if self.supervision_percent and self.subnet_init:
            raise ValueError("A row has tag supervision or subnet init, not both.")

    @property
    def name(self) -> str:
        if self.supervision_percent:
            return f"{self.router}+sup{self.supervision_percent}"
        return f"{self.router}+init" if self.subnet_init else self.router

    @classmethod
    def parse(cls, name: str) -> StudyRow:
        """'top_k', 'top_k+sup10' or 'top_k+init'."""
        router, _, suffix = name.partition("+")
        if not suffix:
            return cls(router)
        if suffix == "init":
            return cls(router, subnet_init=True)
        if suffix.startswith("sup") and suffix[3:].isdigit():
            return cls(router, supervision_percent=int(suffix[3:]))
        raise ValueError(
            f"Cannot read row {name!r}: use ROUTER, ROUTER+sup<percent> (e.g. top_k+sup10) or ROUTER+init."
        )

    @classmethod
    def default_rows(cls) -> list[StudyRow]:
        """Every router, then each learned one with each supervised percentage, then each with subnet init."""
        rows = [cls(r) for r in cls.heuristic_routers + cls.learned_routers]
        rows += [cls(r, supervision_percent=p) for p in SUPERVISION_PERCENTS for r in cls.learned_routers]
        rows += [cls(r, subnet_init=True) for r in cls.learned_routers]
        return rows


def supervised_tags(tags: torch.Tensor, percent: int, seed: int) -> torch.Tensor:
    """`tags` (examples, ...) with -100 outside a fixed random subset of round(percent% of the examples), chosen by
    `seed`: the examples whose tags supervise the routers (paper A 4.4)."""
    n = tags.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))[: round(n * percent / 100)]
    out = torch.full_like(tags, -100)
    out[keep] = tags[keep]
    return out


def tags_for_training(
    router: str | None, supervision_percent: int, tags: torch.Tensor, seed: int
) -> torch.Tensor | None:
    """The tags a row trains with: all of them for tag routing, a supervised subset (`supervised_tags`) for a `+sup`
    row, else None (the router never sees them)."""
    if router == "tag":
        return tags
    if supervision_percent:
        return supervised_tags(tags, supervision_percent, seed)
    return None


def sem(values: list[float]) -> float | None:
    """The standard error of the mean (None for a single value)."""
    n = len(values)
    return float(torch.tensor(values, dtype=torch.float64).std(unbiased=True) / math.sqrt(n)) if n > 1 else None


def supervision_figure(summary: dict[str, dict], row_cls: type[StudyRow], metric: str, title: str):
    """A two-panel figure of paper A's Figure 2: `metric` (with its `<metric>_sem` error bars) and Focus/Cover
    against the tag-supervised percentage, for each learned router that has supervision rows, the heuristic rows as
    horizontal lines. Returns (figure, metric axis, Focus/Cover axis), or None when no router has such a row; the
    caller labels the metric axis and saves."""
    from matplotlib.figure import Figure  # no pyplot: no global figure manager, the backend left as it is

    routers = [
        r
        for r in row_cls.learned_routers
        if any(row_cls(r, supervision_percent=p).name in summary for p in SUPERVISION_PERCENTS)
    ]
    if not routers:
        return None
    percents = (0, *SUPERVISION_PERCENTS)
    fig = Figure(figsize=(11, 4.2))
    ax_metric, ax_fc = fig.subplots(1, 2)
    for i, router in enumerate(routers):
        names = [row_cls(router, supervision_percent=p).name for p in percents]
        xs = [x for x, n in enumerate(names) if n in summary]
        rows = [summary[n] for n in names if n in summary]
        color = f"C{i}"
        errors = [r[f"{metric}_sem"] or 0.0 for r in rows]
        ax_metric.errorbar(xs, [r[metric] for r in rows], yerr=errors, marker="o", capsize=3, color=color, label=router)
        ax_fc.plot(xs, [r["focus"] for r in rows], marker="o", color=color, label=f"{router} focus")
        ax_fc.plot(xs, [r["cover"] for r in rows], marker="s", linestyle="--", color=color, label=f"{router} cover")
    for j, name in enumerate(row_cls.heuristic_routers):
        if name in summary:
            ax_metric.axhline(
                summary[name][metric], color="0.4", linestyle=(0, (1 + 2 * j, 2)), linewidth=1, label=name
            )
    ax_fc.set_ylabel("Focus (solid) / Cover (dashed)")
    ax_fc.set_ylim(0, 1.05)
    for ax in (ax_metric, ax_fc):
        ax.set_xticks(range(len(percents)), [f"{p}%" for p in percents])
        ax.grid(alpha=0.3)
    ax_fc.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return fig, ax_metric, ax_fc


def write_results_json(obj, path: str) -> None:
    """The study's results as JSON: objects indented, lists of numbers on one line (a block's per-expert load is
    one line, not one line per expert)."""

    def dump(value, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(value, dict) and value:
            items = ",\n".join(f"{inner}{json.dumps(str(k))}: {dump(v, depth + 1)}" for k, v in value.items())
            return "{\n" + items + "\n" + pad + "}"
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            return "[\n" + ",\n".join(inner + dump(v, depth + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value)

    with open(path, "w") as f:
        f.write(dump(obj, 0) + "\n")
