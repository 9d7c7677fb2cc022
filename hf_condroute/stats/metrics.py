"""Routing metrics: Focus/Cover (paper A, section 4.2) and per-block load, entropy and stability.

Two kinds of input:

- `active` (examples x C) says which subnetworks ran for each example, C counting the experts of every block
  (`active_subnetworks` builds it from routing decisions); `tag_present` (examples x T) says which tags each
  example has (`tag_presence` builds it from single- or multi-group tags, -100 unknown).
- per block, expert ids (..., k) with -1 for an empty slot (padding, or an Expert Choice row that no expert
  took); `expert_counts` turns them into counts, from which load, entropy, max share and usage follow.

Counts and indicator matrices, not per-step averages, are what gets accumulated: they add up exactly over
batches and over processes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..routers.base import RoutingDecision

UNKNOWN_TAG = -100

Routing = Mapping[str, RoutingDecision]


def _as_bool(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2:
        raise ValueError(f"{what} must be a 2-d (examples x columns) matrix, got shape {tuple(t.shape)}.")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{what} must be boolean (or 0/1), got values other than 0 and 1.")
        t = t.bool()
    return t.cpu()


# ----- Focus / Cover ------------------------------------------------------------------------------
def alignment_from_counts(both: torch.Tensor, tag_count: torch.Tensor, active_count: torch.Tensor) -> torch.Tensor:
    """F1 matrix (T, C) from counts that add up over batches and processes.

    both[i, j]: examples with tag i present and subnetwork j active; tag_count[i]: examples with tag i present;
    active_count[i, j] (or [j]): examples, among those whose tag i is known, with subnetwork j active.
    F1 = 2 TP / (2 TP + FP + FN) = 2 both / (tag_count + active_count), 0 where both sides are empty
    (sklearn's `f1_score(..., zero_division=0)`).
    """
    both = both.double()
    denom = tag_count.double().unsqueeze(1) + active_count.double()
    return torch.where(denom > 0, 2 * both / denom.clamp(min=1), torch.zeros_like(both))


def alignment_matrix(active, tag_present, known=None) -> torch.Tensor:
    """A[i, j] = F1 score between "tag i present" and "subnetwork j active" over the examples, (T, C).

    `known` (examples x T, optional) leaves out, for tag i, the examples whose tag i is unknown (an unknown tag
    group). See `alignment_from_counts`.
    """
    a = _as_bool(active, "active").double()
    y = _as_bool(tag_present, "tag_present").double()
    if a.shape[0] != y.shape[0]:
        raise ValueError(
            f"active has {a.shape[0]} examples but tag_present has {y.shape[0]}: give one row per example to both."
        )
    if known is None:
        return alignment_from_counts(y.T @ a, y.sum(0), a.sum(0))
    k = _as_bool(known, "known").double()
    if k.shape != y.shape:
        raise ValueError(f"known must have the shape of tag_present {tuple(y.shape)}, got {tuple(k.shape)}.")
    y = y * k
    return alignment_from_counts(y.T @ a, y.sum(0), k.T @ a)


def focus_cover(active, tag_present, known=None) -> tuple[float, float, torch.Tensor]:
    """Paper A's Focus and Cover, and the alignment matrix they summarise.

    active: bool (examples, C), subnetwork j (of C across all blocks) active for each example.
    tag_present: bool (examples, T), tag i present in each example.
    known: optional bool (examples, T), whether tag i's presence is known for each example (default: all).

    Returns (focus, cover, alignment) with alignment (T, C) as in `alignment_matrix`,
    Focus = mean over subnetworks j of max_i A[i, j], Cover = mean over tags i of max_j A[i, j].
    Subnetworks never active count 0 towards Focus and tags never present 0 towards Cover, as in the paper's
    definition (C and T count all of them); a warning names the tags absent from the data.
    """
    alignment = alignment_matrix(active, tag_present, known)
    if alignment.numel() == 0:
        raise ValueError(
            f"focus_cover needs at least one subnetwork and one tag, got alignment {tuple(alignment.shape)}."
        )
    present = _as_bool(tag_present, "tag_present")
    if known is not None:
        present = present & _as_bool(known, "known")
    absent = (~present.any(0)).nonzero().flatten().tolist()
    if absent:
        warnings.warn(
            f"Tags {absent} never occur in the evaluated examples: each counts 0 towards Cover. Evaluate on data "
            "that has every tag, or pass only the tags you have.",
            stacklevel=2,
        )
    return (*focus_cover_scores(alignment), alignment)


def focus_cover_scores(alignment: torch.Tensor) -> tuple[float, float]:
    """(Focus, Cover) of an alignment matrix (T tags, C subnetworks): mean over subnetworks of the best tag's
    F1, mean over tags of the best subnetwork's F1."""
    return float(alignment.max(dim=0).values.mean()), float(alignment.max(dim=1).values.mean())


def _batches(routing: Routing | Sequence[Routing]) -> list[Routing]:
    if isinstance(routing, Mapping):
        return [routing]
    batches = list(routing)
    if not batches:
        raise ValueError("Got no routing decisions: pass `get_routing(model)` of at least one forward.")
    return batches


def _experts_per_example(decision: RoutingDecision) -> torch.Tensor:
    """(B, k) or (B, L, k) expert ids -> (B, S) ids (S = slots over all tokens), -1 empty."""
    e = decision.experts
    return e.reshape(e.shape[0], -1)


def block_active(decision: RoutingDecision, num_experts: int | None = None) -> torch.Tensor:
    """bool (B, N): expert j ran for example b (for per-token routing: for at least one of its tokens)."""
    n = num_experts if num_experts is not None else decision.probs.shape[-1]
    e = _experts_per_example(decision).cpu()
    valid = e >= 0
    out = torch.zeros(e.shape[0], n + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(valid, e, torch.full_like(e, n)), True)
    return out[:, :n]


def active_subnetworks(routing: Routing | Sequence[Routing]) -> torch.Tensor:
    """bool (examples, C): which of the C subnetworks (every expert of every block, blocks in order) each
    example ran through. `routing` is `hf_condroute.get_routing(model)` of one forward, or a list of them over
    batches (examples concatenated in order)."""
    batches = _batches(routing)
    names = list(batches[0])
    sizes = {name: batches[0][name].probs.shape[-1] for name in names}
    rows = []
    for i, batch in enumerate(batches):
        if list(batch) != names:
            raise ValueError(
                f"Routing of batch {i} has blocks {list(batch)} but batch 0 had {names}: collect every batch from the "
                "same model and adapter."
            )
        rows.append(torch.cat([block_active(batch[n], sizes[n]) for n in names], dim=1))
    return torch.cat(rows, dim=0)


def subnetwork_labels(routing: Routing | Sequence[Routing]) -> list[str]:
    """Names of the columns of `active_subnetworks`: "<block>:<expert>"."""
    first = _batches(routing)[0]
    return [f"{name}:{j}" for name, d in first.items() for j in range(d.probs.shape[-1])]


def tag_presence(tags, tags_per_group: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indicator matrices of tags: (present, known), both bool (examples, T).

    tags: (examples,) for one tag group, or (examples, G) for G groups (DAE-Syn: 4 factors x 8 values);
        -100 marks an unknown tag.
    tags_per_group: tags in each group (one int for all groups, or one per group); None infers max tag + 1 per
        group from `tags` (a tag value that never occurs past the largest one is then not counted).
    Group g's tag t is column sum(tags_per_group[:g]) + t. known[n, i] is False where example n's group of tag
    i is unknown.
    """
    t = torch.as_tensor(tags).cpu()
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"tags must be integer tag ids (-100 unknown), got dtype {t.dtype}.")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2:
        raise ValueError(f"tags must have shape (examples,) or (examples, groups), got {tuple(t.shape)}.")
    t = t.long()
    groups = t.shape[1]
    known_tag = t != UNKNOWN_TAG
    if tags_per_group is None:
        sizes = [int(t[:, g][known_tag[:, g]].max()) + 1 if bool(known_tag[:, g].any()) else 0 for g in range(groups)]
    elif isinstance(tags_per_group, int):
        sizes = [tags_per_group] * groups
    else:
        sizes = [int(s) for s in tags_per_group]
        if len(sizes) != groups:
            raise ValueError(
                f"tags have {groups} groups but tags_per_group gives {len(sizes)} sizes: give one per group."
            )
    bad = known_tag & ((t < 0) | (t >= torch.tensor(sizes).unsqueeze(0)))
    if bool(bad.any()):
        g = int(bad.nonzero()[0, 1])
        raise ValueError(
            f"Tag values {sorted(set(t[:, g][bad[:, g]].tolist()))} in group {g} are outside 0..{sizes[g] - 1} "
            "(-100 marks unknown): raise tags_per_group or fix the tags."
        )
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    present = torch.zeros(t.shape[0], offsets[-1], dtype=torch.bool)
    known = torch.zeros_like(present)
    for g in range(groups):
        rows = known_tag[:, g].nonzero().flatten()
        present[rows, offsets[g] + t[rows, g]] = True
        known[:, offsets[g] : offsets[g + 1]] = known_tag[:, g : g + 1]
    return present, known


def routing_focus_cover(
    routing: Routing | Sequence[Routing], tags, tags_per_group: int | Sequence[int] | None = None
) -> tuple[float, float, torch.Tensor]:
    """Focus/Cover straight from decisions (`get_routing(model)`, or a list over batches) and their tags."""
    active = active_subnetworks(routing)
    present, known = tag_presence(tags, tags_per_group)
    if present.shape[0] != active.shape[0]:
        raise ValueError(
            f"The routing covers {active.shape[0]} examples but tags has {present.shape[0]} rows: give the tags of "
            "exactly the routed examples, in order."
        )
    return focus_cover(active, present, known if not bool(known.all()) else None)


# ----- per-block load --------------------------------------------------------------------------------
def expert_counts(experts: torch.Tensor, num_experts: int, check: bool = True) -> torch.Tensor:
    """Assignments per expert (N,) float64 on the device of `experts` (..., k); -1 (empty slot, padding) is left
    out. With top-1 routing per example the counts are examples per expert; per token, tokens per expert; with
    top-k each example (token) counts once for each of its k experts.

    check=False skips the range check, which waits for the device (the training callback counts every step).
    """
    e = experts.reshape(-1)
    if check and e.numel() and int(e.max()) >= num_experts:
        raise ValueError(f"Expert id {int(e.max())} is out of range for a block of {num_experts} experts.")
    valid = e >= 0
    counts = torch.zeros(num_experts, dtype=torch.float64, device=e.device)
    return counts.scatter_add_(0, torch.where(valid, e, torch.zeros_like(e)), valid.to(torch.float64))


def expert_load(counts: torch.Tensor) -> torch.Tensor:
    """Share of assignments per expert (sums to 1); all zero when nothing was routed."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def normalized_entropy(p: torch.Tensor) -> float:
    """Entropy of a distribution over N outcomes divided by log N: 1 uniform, 0 one outcome.

    For N == 1 the single outcome is both; it is reported as 1 (the load is as balanced as it can be)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    n = p.shape[-1]
    if n == 1:
        return 1.0
    h = -(p * torch.log(p.clamp(min=1e-300))).sum()
    return float(h / math.log(n)) + 0.0  # + 0.0: no -0.0 for a single used expert


def max_share(counts: torch.Tensor) -> float:
    """Share of the busiest expert."""
    return float(expert_load(counts).max())


def fraction_used(counts: torch.Tensor) -> float:
    """Fraction of experts that got at least one assignment."""
    counts = torch.as_tensor(counts)
    return float((counts > 0).double().mean())


def mean_probs_entropy(probs: torch.Tensor, experts: torch.Tensor | None = None) -> float:
    """Mean over routed rows of the normalised entropy of the router's distribution (how undecided it is);
    rows whose slots are all -1 (padding) are left out when `experts` is given."""
    n = probs.shape[-1]
    if n == 1:
        return 1.0
    p = probs.reshape(-1, n).double()
    if experts is not None:
        p = p[(experts.reshape(-1, experts.shape[-1]) >= 0).any(-1)]
    if p.shape[0] == 0:
        raise ValueError("No routed rows: every slot is -1.")
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
    return float(h.mean() / math.log(n))


def flip_counts(experts_a: torch.Tensor, experts_b: torch.Tensor) -> tuple[int, int]:
    """(rows whose set of chosen experts differs, rows routed in either) between two decisions (..., k) of the
    same examples. Slot order does not matter; rows empty in both (padding) are left out."""
    if experts_a.shape != experts_b.shape:
        raise ValueError(
            f"The two decisions have shapes {tuple(experts_a.shape)} and {tuple(experts_b.shape)}: compare "
            "evaluations of the same examples, in the same order and padding."
        )
    k = experts_a.shape[-1]
    a = experts_a.reshape(-1, k).sort(-1).values
    b = experts_b.reshape(-1, k).sort(-1).values
    routed = (a >= 0).any(-1) | (b >= 0).any(-1)
    flipped = (a != b).any(-1) & routed
    return int(flipped.sum()), int(routed.sum())


def flip_rate(experts_a: torch.Tensor, experts_b: torch.Tensor) -> float:
    """Fraction of rows (examples, or tokens) whose set of chosen experts differs between two evaluations of
    the same examples (see `flip_counts`)."""
    flipped, routed = flip_counts(experts_a, experts_b)
    if routed == 0:
        raise ValueError("No routed rows in either decision: every slot is -1.")
    return flipped / routed


def routing_flip_rate(routing_a: Routing, routing_b: Routing) -> dict[str, float]:
    """flip_rate per block between two `get_routing(model)` results on the same batch."""
    if list(routing_a) != list(routing_b):
        raise ValueError("The two routings have different blocks: compare the same model and adapter.")
    return {name: flip_rate(routing_a[name].experts, routing_b[name].experts) for name in routing_a}


def block_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Summary of one block's counts: load entropy, max share and fraction of experts used."""
    return {
        "load_entropy": normalized_entropy(expert_load(counts)),
        "max_share": max_share(counts),
        "experts_used": fraction_used(counts),
    }
