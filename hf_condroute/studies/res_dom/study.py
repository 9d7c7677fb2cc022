"""The rows of paper A's Res-Dom study (Tables 1-2, Figure 2), their training with the stock `Trainer`, and scoring.

A row is a router plus optional tag supervision (paper A 4.4: the domain supervises the routers on a fixed random
subset of the training images, -100 elsewhere) or subnet init (4.3: experts and classifier start from the same
seed's tag-routing run, routers fresh, then as many steps again). Each row is trained once per seed and scored on
the test split: accuracy per domain and averaged, Focus/Cover of its routing against the 6 domains, and each
block's load (the share of test images each expert gets).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from hf_condroute import get_routing
from hf_condroute.integrations.warm_start import load_experts_from
from hf_condroute.routers import router_class
from hf_condroute.stats.metrics import expert_counts, expert_load, routing_focus_cover

from ..rows import HEURISTIC_ROUTERS, SUPERVISION_PERCENTS, StudyRow, sem, supervised_tags, tags_for_training  # noqa: F401
from .data import ResDomData
from .model import AdapterSettings, ResDomDataset, routed_model, training_arguments

# the routers whose decisions are learned, so tag supervision and subnet init apply to them
LEARNED_ROUTERS = ("top_k", "st_gumbel", "reinforce", "moesart", "dselect_k", "smear")
PAPER_GUMBEL_STEPS = 100_000  # the paper code anneals the ST-Gumbel temperature at 1e-4 per step over 100k steps


class Row(StudyRow):
    """One row of the Res-Dom study: `router`, `router+sup<percent>` or `router+init`."""

    study = "Res-Dom"
    learned_routers = LEARNED_ROUTERS


def default_rows() -> list[Row]:
    return Row.default_rows()


@dataclass(frozen=True)
class TrainSettings:
    """How each row trains (the adapters, routers and classifier; the backbone is frozen)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    tag_supervision_coef: float = 1.0  # per block, so the 8 blocks' cross-entropies add up (as DAE-Syn's)
    eval_batch_size: int = 512
    adapters: AdapterSettings = field(default_factory=AdapterSettings)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"Need steps >= 1 and batch_size >= 2 (the routers' BatchNorm), got {self.steps} and {self.batch_size}."
            )


def adapter_settings(row: Row, settings: TrainSettings, seed: int) -> AdapterSettings:
    """The row's router settings on top of the study's adapters."""
    # the fewest experts each router may pick: 2 for MOESART (paper B), 1 for every other router
    extra = dict(settings.adapters.extra, top_k=router_class(row.router).min_top_k, hash_seed=seed)
    if row.router == "st_gumbel":
        # reach the temperature floor at the same fraction of training as the paper's 1e-4 over 100k steps
        extra["gumbel_anneal_rate"] = 1e-4 * PAPER_GUMBEL_STEPS / settings.steps
    if row.supervision_percent:
        extra["tag_supervision_coef"] = settings.tag_supervision_coef
    return AdapterSettings(settings.adapters.num_experts, settings.adapters.adapter_dim, extra)


def training_tags(row: Row, data: ResDomData, seed: int) -> torch.Tensor:
    tags = tags_for_training(row.router, row.supervision_percent, data.domains, seed)
    return tags if tags is not None else torch.full_like(data.domains, -100)  # the Trainer needs the column


@torch.no_grad()
def evaluate(model, data: ResDomData, router: str, batch_size: int = 512) -> dict:
    """Test accuracy per domain and averaged over domains, Focus/Cover against the domains, and per-block load,
    in eval mode (routers deterministic). Only tag routing reads the test images' domains."""
    model.eval()
    dataset = ResDomDataset(data)
    correct, routing = [], []
    counts: dict[str, torch.Tensor] = {}
    for start in range(0, len(data), batch_size):
        batch = torch.utils.data.default_collate([dataset[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch.pop("labels")
        if router != "tag":
            batch.pop("routing_tags")
        logits = model(**batch).logits
        correct.append(logits.argmax(-1) == labels)
        decisions = get_routing(model)
        routing.append(decisions)
        for name, d in decisions.items():
            c = expert_counts(d.experts, model.peft_config["default"].num_experts)
            counts[name] = counts[name] + c if name in counts else c
    correct = torch.cat(correct)
    per_domain = [float(correct[data.domains == d].float().mean()) for d in range(len(data.domain_names))]
    focus, cover, _ = routing_focus_cover(routing, data.domains, len(data.domain_names))
    return {
        "accuracy": 100 * sum(per_domain) / len(per_domain),
        "domain_accuracy": {name: 100 * a for name, a in zip(data.domain_names, per_domain)},
        "focus": focus,
        "cover": cover,
        "load": {name: expert_load(c).tolist() for name, c in counts.items()},
    }


def run_row(
    row: Row,
    seed: int,
    train: ResDomData,
    test: ResDomData,
    backbone: str,
    settings: TrainSettings,
    init_from: str | None = None,
    save_to: str | None = None,
) -> dict:
    """Train one row for one seed with the stock Trainer and score it on `test`. A `+init` row starts its experts
    and classifier from `init_from` (a tag run saved with `save_to`)."""
    model = routed_model(backbone, len(train.class_names), row.router, adapter_settings(row, settings, seed), seed)
    if row.subnet_init:
        if init_from is None:
            raise ValueError(
                f"Row {row.name} starts from a tag-routing run: pass `init_from=` (the tag row's `save_to`)."
            )
        load_experts_from(model, init_from)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, settings.steps, settings.batch_size, settings.lr, seed)
        dataset = ResDomDataset(train, training_tags(row, train, seed))
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed per run
        trainer.train()
    scores = evaluate(model, test, row.router, settings.eval_batch_size)
    if save_to is not None:
        os.makedirs(save_to, exist_ok=True)
        model.save_pretrained(save_to)
    return scores


def summarize(per_seed: list[dict]) -> dict:
    """Means over seeds; accuracy_sem is the standard error of the mean accuracy (None for one seed)."""
    n = len(per_seed)
    acc = [s["accuracy"] for s in per_seed]
    domains = per_seed[0]["domain_accuracy"]
    blocks = per_seed[0]["load"]
    return {
        "accuracy": sum(acc) / n,
        "accuracy_sem": sem(acc),
        "domain_accuracy": {d: sum(s["domain_accuracy"][d] for s in per_seed) / n for d in domains},
        "focus": sum(s["focus"] for s in per_seed) / n,
        "cover": sum(s["cover"] for s in per_seed) / n,
        "load": {b: [sum(s["load"][b][e] for s in per_seed) / n for e in range(len(blocks[b]))] for b in blocks},
        "seeds": n,
    }
