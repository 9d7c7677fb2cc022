"""Training and scoring one row of the real-text study on precomputed features (see model.Backbone).

The task is next-token classification: the loss is the cross-entropy of the two label words' logits at the
prompt's last position (" negative" / " positive"), read through the model's own LM head. Training is AdamW with
10% warm-up and linear decay, gradient clipping 1, batches drawn epoch by epoch in a seeded order; routed rows add
their auxiliary routing losses (`hf_condroute.routing_loss`). Scoring is accuracy per source on a split, the
overall score their mean, and for learned routers Focus/Cover of the routing against the source.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import get_linear_schedule_with_warmup

from hf_condroute import RoutingDecision, get_routing, routing_focus_cover, routing_loss

from ..rows import tags_for_training
from .data import Review, encode
from .model import Backbone, Batch, label_logits, left_pad

# Per-example routing pools over the whole prompt, which the last position (the only one read) sees anyway
EXAMPLE_ROUTING_WARNING = ".*routing_granularity='example' routes every position.*"
TEST_KEY_OFFSET = 1_000_000  # hash routing's keys: the example's index in its split, offset per split


@dataclass
class Encoded:
    """A split as the top model reads it: each example's features (tokens, D), its label and source."""

    features: list[torch.Tensor]
    labels: torch.Tensor
    sources: torch.Tensor
    key_offset: int = 0

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, Batch]:
        """Left-padded features (B, L, D) and their mask and positions."""
        lengths = [self.features[i].shape[0] for i in idx]
        length = max(lengths)
        out = self.features[idx[0]].new_zeros(len(idx), length, self.features[idx[0]].shape[-1])
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for row, (i, n) in enumerate(zip(idx, lengths)):
            out[row, length - n :] = self.features[i]
            mask[row, length - n :] = 1
        return out, Batch(None, mask, (mask.cumsum(1) - 1).clamp(min=0))

    def keys(self, idx: list[int]) -> torch.Tensor:
        return torch.tensor(idx, dtype=torch.long) + self.key_offset


def encode_split(
    backbone: Backbone, tokenizer, reviews: list[Review], max_review_tokens: int, batch_size: int, key_offset: int = 0
) -> Encoded:
    """Every review through the frozen bottom layers once, in batches of similar length (little padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [encode(tokenizer, r, max_review_tokens) for r in reviews]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    features: list[torch.Tensor | None] = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        hidden = backbone.features(left_pad([seqs[i] for i in chunk], pad))
        for row, i in enumerate(chunk):
            features[i] = hidden[row, hidden.shape[1] - len(seqs[i]) :].clone()
    labels = torch.tensor([r.label for r in reviews], dtype=torch.long)
    sources = torch.tensor([r.source for r in reviews], dtype=torch.long)
    return Encoded(features, labels, sources, key_offset)


def routing_kwargs(row, data: Encoded, idx: list[int], tags: torch.Tensor | None) -> dict:
    """What the row's routers read besides the hidden states: the source (tag routing; supervision in training)
    and a fixed key per example (hash routing)."""
    if row.method != "routed":
        return {}
    out = {"routing_keys": data.keys(idx)} if row.granularity == "example" else {}
    if tags is not None:
        out["routing_tags"] = tags[idx]
    return out


def train(model, data: Encoded, row, label_ids: list[int], steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Train `model` (a PEFT model of the top layers) for `steps`; returns the median wall and CPU seconds per
    step (the first steps, which allocate, are left out of the median)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    tags = tags_for_training(row.router, row.supervision_percent, data.sources, seed)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=order).tolist(), 0
    wall, cpu = [], []
    for _ in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(data), generator=order).tolist(), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        t0, c0 = time.perf_counter(), time.process_time()
        features, batch = data.batch(idx)
        logits = label_logits(model, features, batch, label_ids, **routing_kwargs(row, data, idx, tags))
        loss = torch.nn.functional.cross_entropy(logits, data.labels[idx])
        if row.method == "routed":
            loss = loss + routing_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    skip = min(2, steps - 1)
    return {"step_seconds": statistics.median(wall[skip:]), "step_cpu_seconds": statistics.median(cpu[skip:])}


def token_rows(decision, tags: torch.Tensor):
    """A per-token decision (B, L, k) as one row per real token, each tagged with its example's source."""
    if decision.experts.dim() == 2:
        return decision, tags
    real = decision.experts[..., 0] >= 0
    rows = dataclasses.replace(
        decision,
        experts=decision.experts[real],
        weights=decision.weights[real],
        probs=decision.probs[real],
        logits=None,
        baseline=None,
        dropped=None,
    )
    return rows, tags.unsqueeze(1).expand(real.shape)[real]


def xlora_decisions(model, tags: torch.Tensor, mask: torch.Tensor):
    """X-LoRA's last scalings (B, L, layers, LoRAs) as per-token top-1 decisions on the real tokens (`mask`), one
    block per adapted layer."""
    real = mask.bool()
    scalings = model.get_latest_scalings()[real].float()  # (tokens, layers, LoRAs)
    out = {}
    for layer in range(scalings.shape[1]):
        probs = scalings[:, layer]
        top = probs.max(-1, keepdim=True)
        out[f"layer{layer}"] = RoutingDecision(top.indices, top.values, probs)
    return out, tags.unsqueeze(1).expand(real.shape)[real]


@torch.no_grad()
def evaluate(model, data: Encoded, row, label_ids: list[int], num_sources: int, batch_size: int) -> dict:
    """Accuracy per source and their mean (in %), and Focus/Cover of a learned routing against the source. Only
    tag routing reads the sources of the examples it scores."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: data.features[i].shape[0])
    correct = torch.zeros(len(data), dtype=torch.bool)
    routing, routed_tags = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        features, batch = data.batch(idx)
        tags = data.sources if row.router == "tag" else None
        logits = label_logits(model, features, batch, label_ids, **routing_kwargs(row, data, idx, tags))
        correct[idx] = logits.argmax(-1) == data.labels[idx]
        if row.learned:
            source = data.sources[idx]
            if row.method == "xlora":
                decisions, source = xlora_decisions(model, source, batch.attention_mask)
            else:
                decisions = {}
                for name, decision in get_routing(model).items():
                    decisions[name], flat = token_rows(decision, source)
                source = flat if decisions else source
            routing.append(decisions)
            routed_tags.append(source)
    per_source = [100 * float(correct[data.sources == s].float().mean()) for s in range(num_sources)]
    scores = {"accuracy": sum(per_source) / num_sources, "source_accuracy": per_source}
    if routing:
        scores["focus"], scores["cover"], _ = routing_focus_cover(routing, torch.cat(routed_tags), num_sources)
    return scores
