"""Permutation-based local search over which bank expert serves each router output (COMET, Ibrahim et al. 2023:
"COMET+", and with any gate: Hash-r+, Top-k+, DSelect-k+).

With `expert_permutation=True` every router holds `expert_map` (router output j is computed by bank expert
expert_map[j], identity at first). `local_search` tries swaps of two entries of a block's map, keeps a swap when it
lowers the loss on the given batches, and undoes it otherwise; the router and the bank are not changed, so no
optimiser state goes stale. `LocalSearchCallback` runs it every few optimiser steps of a `transformers.Trainer`.

The authors' code realises the search as a relaxed permutation (Sinkhorn over a learned matrix, annealed, then
rounded by the Hungarian algorithm) learned jointly during the first epochs; this module searches the same space
(one permutation per block, shared by the router's k choices) by explicit swap moves with an acceptance test.
`relabel_experts` moves experts inside the bank and composes the map with the same permutation: the model computes
the same function, which is why a search over maps alone is a search over expert assignments.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ..block.routed_block import RoutedBlock

logger = logging.getLogger(__name__)


@dataclass
class LocalSearchResult:
    initial_loss: float
    final_loss: float
    accepted: list = field(default_factory=list)  # (block name, output i, output j, loss after the swap)
    evaluations: int = 0


def permutable_routers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: router} of the routers with an `expert_map`, the gates of a multi-gate block each under
    `name[gate]`; a clear error when there are none."""
    routers = {}
    for name, m in model.named_modules():
        if not isinstance(m, RoutedBlock):
            continue
        gates = m.router.items() if isinstance(m.router, nn.ModuleDict) else [(None, m.router)]
        for gate, router in gates:
            if hasattr(router, "expert_map"):
                routers[name if gate is None else f"{name}[{gate}]"] = router
    if not routers:
        raise ValueError(
            "Local search found no router with an expert permutation. Build the model with "
            "`expert_permutation=True` in its routing config (RoutedAdapterConfig, RoutedFFNConfig or RoutingConfig)."
        )
    return routers


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "Local search evaluates `model(**batch).loss`, but the model returned no loss: put `labels` in the "
            "batches, or pass `loss_fn=lambda model, batch: ...`."
        )
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, loss_fn: Callable) -> float:
    return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def local_search(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    rounds: int = 1,
    max_swaps_per_block: int | None = None,
    min_improvement: float = 0.0,
    seed: int = 0,
) -> LocalSearchResult:
    """Greedy first-improvement swap search over every permutable router's `expert_map` (each gate of a
    multi-gate block has its own).

    batches: what the loss is averaged over (kept fixed for the whole search). loss_fn(model, batch): a scalar;
    default `model(**batch).loss`. Each round tries, block by block, every pair of outputs (or a random
    `max_swaps_per_block` of them) and keeps a swap that lowers the mean loss by more than `min_improvement`.
    The model runs in eval mode (deterministic routing, no BatchNorm updates) and is put back in its mode."""
    batches = list(batches)
    if not batches:
        raise ValueError("local_search needs at least one batch to evaluate the loss on; pass a non-empty list.")
    if rounds < 1 or (max_swaps_per_block is not None and max_swaps_per_block < 1):
        raise ValueError(f"rounds and max_swaps_per_block must be >= 1, got {rounds} and {max_swaps_per_block}.")
    loss_fn = loss_fn or default_loss
    routers = permutable_routers(model)
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    try:
        best = evaluate(model, batches, loss_fn)
        result = LocalSearchResult(initial_loss=best, final_loss=best, evaluations=1)
        for _ in range(rounds):
            improved = False
            for name, router in routers.items():
                expert_map = router.expert_map
                n = expert_map.numel()
                pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
                if max_swaps_per_block is not None and max_swaps_per_block < len(pairs):
                    pairs = rng.sample(pairs, max_swaps_per_block)
                for i, j in pairs:
                    expert_map[[i, j]] = expert_map[[j, i]]
                    loss = evaluate(model, batches, loss_fn)
                    result.evaluations += 1
                    if loss < best - min_improvement:
                        best, improved = loss, True
                        result.accepted.append((name, i, j, loss))
                    else:
                        expert_map[[i, j]] = expert_map[[j, i]]
            if not improved:
                break
        result.final_loss = best
        return result
    finally:
        model.train(was_training)


@torch.no_grad()
def relabel_experts(block: RoutedBlock, perm: torch.Tensor) -> None:
    """Move bank expert e to position perm[e] and map each router output to the expert's new position: the block
    computes the same function. Needs `expert_permutation=True` and a bank whose parameters all have one row per
    expert (adapters, embeddings). `relabel_experts(block, block.router.expert_map.argsort())` makes the map the
    identity again, with the searched assignment moved into the bank."""
    router, bank = block.router, block.experts
    if not hasattr(router, "expert_map"):
        raise ValueError(f"Block {block.name or '<unnamed>'} has no expert map: build it with expert_permutation=True.")
    n = bank.num_experts
    perm = torch.as_tensor(perm, dtype=torch.long, device=router.expert_map.device)
    if sorted(perm.tolist()) != list(range(n)):
        raise ValueError(f"perm must be a permutation of 0..{n - 1}, got {perm.tolist()}.")
    tensors = list(bank.parameters()) + list(bank.buffers())
    bad = [tuple(t.shape) for t in tensors if t.dim() == 0 or t.shape[0] != n]
    if bad:
        raise ValueError(
            f"The bank of block {block.name or '<unnamed>'} has tensors without one row per expert (shapes {bad}), so "
            "its experts cannot be moved; search the expert map alone (local_search) instead."
        )
    inverse = perm.argsort()  # new position p holds old expert inverse[p]
    for t in tensors:
        t.copy_(t.index_select(0, inverse.to(t.device)))
    router.expert_map.copy_(perm[router.expert_map])


class LocalSearchCallback(TrainerCallback):
    """Runs `local_search` on the model every `every_n_steps` optimiser steps, up to `until_step` (COMET+ searches
    during the first epochs only; None: all training). `batches` are the fixed batches the loss is evaluated on
    (e.g. a few held-out training batches, moved to the model's device); the other arguments go to
    `local_search`. Results are kept in `self.results` as (step, LocalSearchResult)."""

    def __init__(
        self, batches: Iterable[dict], every_n_steps: int = 100, until_step: int | None = None, **search_kwargs
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.batches = list(batches)
        self.every_n_steps = every_n_steps
        self.until_step = until_step
        self.search_kwargs = search_kwargs
        self.results: list[tuple[int, LocalSearchResult]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if model is None or step % self.every_n_steps or (self.until_step is not None and step > self.until_step):
            return control
        result = local_search(model, self.batches, **self.search_kwargs)
        self.results.append((step, result))
        logger.info(
            "local search at step %d: loss %.5f -> %.5f, %d swaps kept",
            step,
            result.initial_loss,
            result.final_loss,
            len(result.accepted),
        )
        return control
