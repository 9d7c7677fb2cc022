"""Training, evaluation and the rows of paper A's DAE-Syn study (Tables 1-4, Figure 2).

A row is a router plus optional tag supervision (paper A 4.4) or subnet init (4.3); each row is trained once
per seed and scored by the reconstruction loss over all 4096 images after a fixed number of steps, with
Focus/Cover of its routing. Training goes through the core exactly as the PEFT tuner does: one `RoutingStep`
per forward, `set_reward` with each image's own loss (REINFORCE), `add_to_loss` for the auxiliary losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import get_linear_schedule_with_warmup

from hf_condroute import RoutingStep, routing_focus_cover
from hf_condroute.routers import router_class

from ..rows import HEURISTIC_ROUTERS, SUPERVISION_PERCENTS, StudyRow, sem, supervised_tags, tags_for_training  # noqa: F401
from .data import NUM_VALUES, DAESynData
from .model import DAEConfig, DiscreteAutoencoder, routing_configs

# the routers whose decisions are learned, so tag supervision and subnet init apply to them
LEARNED_ROUTERS = ("top_k", "st_gumbel", "reinforce", "moesart", "dselect_k", "comet", "smear")
PAPER_GUMBEL_STEPS = 100_000  # the paper code: anneal rate 1e-4 (the core default) over 100k steps


class Row(StudyRow):
    """One row of the DAE-Syn study: `router`, `router+sup<percent>` or `router+init`."""

    study = "DAE-Syn"
    learned_routers = LEARNED_ROUTERS


def default_rows() -> list[Row]:
    return Row.default_rows()


@dataclass(frozen=True)
class TrainSettings:
    """How each row is trained; see README "Results: DAE-Syn" for why these differ from the paper's code."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to 0
    grad_clip: float = 1.0
    tag_supervision_coef: float = 1.0  # per block, so the four blocks add up as in the paper's code
    eval_batch_size: int = 512
    model: DAEConfig = DAEConfig()

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"Need steps >= 1 and batch_size >= 2 (the routers' BatchNorm), got {self.steps} and {self.batch_size}."
            )


def routing_for(row: Row, settings: TrainSettings, seed: int) -> list:
    """The four blocks' RoutingConfigs of a row."""
    # the fewest vectors each router may pick per block: 2 for MOESART (paper B), 1 for every other router
    overrides = dict(top_k=router_class(row.router).min_top_k, hash_seed=seed)
    if row.router == "st_gumbel":
        # reach the temperature floor at the same fraction of training as the paper's 1e-4 over 100k steps
        overrides["gumbel_anneal_rate"] = 1e-4 * PAPER_GUMBEL_STEPS / settings.steps
    if row.supervision_percent:
        overrides["tag_supervision_coef"] = settings.tag_supervision_coef
    return routing_configs(row.router, **overrides)


def per_image_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of each image (B,)."""
    return (recon - images).pow(2).flatten(1).sum(dim=1)


def train(
    model: DiscreteAutoencoder,
    data: DAESynData,
    settings: TrainSettings,
    seed: int,
    tags: torch.Tensor | None,
    on_steps: Callable[[int], None] | None = None,
) -> None:
    """Adam with warm-up and linear decay, gradient clipping; batches drawn epoch by epoch without replacement.
    `tags` are the routing tags the blocks see in training (-100 where unknown), or None."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.steps), settings.steps)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=order), 0
    for step_index in range(settings.steps):
        if pos + settings.batch_size > len(perm):
            perm, pos = torch.randperm(len(data), generator=order), 0
        idx = perm[pos : pos + settings.batch_size]
        pos += settings.batch_size
        x = data.images[idx]
        step = RoutingStep()
        losses = per_image_loss(model(x, tags=None if tags is None else tags[idx], keys=idx, step=step), x)
        step.set_reward(losses)
        loss = step.add_to_loss(losses.mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        if on_steps is not None and (step_index + 1) % 50 == 0:
            on_steps(50)
    if on_steps is not None:
        on_steps(settings.steps % 50)


@torch.no_grad()
def evaluate(model: DiscreteAutoencoder, data: DAESynData, batch_size: int = 512) -> dict[str, float]:
    """Mean per-image squared error over all images in eval mode (routers deterministic), and Focus/Cover of the
    routing against the four factors' 32 tags."""
    model.eval()
    losses, routing = [], []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        step = RoutingStep()
        images = data.images[idx]
        losses.append(per_image_loss(model(images, tags=data.tags[idx], keys=idx, step=step), images))
        routing.append({name: record.user_decision() for name, record in step.records.items()})
    focus, cover, _ = routing_focus_cover(routing, data.tags, NUM_VALUES)
    return {"loss": float(torch.cat(losses).mean()), "focus": focus, "cover": cover}


def build_model(row: Row, settings: TrainSettings, seed: int) -> DiscreteAutoencoder:
    torch.manual_seed(seed)
    model = DiscreteAutoencoder(routing_for(row, settings, seed), settings.model)
    return model.to(memory_format=torch.channels_last)


def run_row(
    row: Row,
    seed: int,
    data: DAESynData,
    settings: TrainSettings,
    pretrained: dict[str, torch.Tensor] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """Train and evaluate one row for one seed. Returns its scores and, for the tag row, the subnetworks and
    decoder that subnet-init rows start from. A `+init` row needs `pretrained` (see `pretrain_for_init`)."""
    model = build_model(row, settings, seed)
    if row.subnet_init:
        if pretrained is None:
            raise ValueError(f"Row {row.name} starts from a tag-routing model: pass `pretrained=` (pretrain_for_init).")
        model.load_state_dict(pretrained, strict=False)
    tags = tags_for_training(row.router, row.supervision_percent, data.tags, seed)
    train(model, data, settings, seed, tags, on_steps)
    scores = evaluate(model, data, settings.eval_batch_size)
    carried = model.subnetworks_and_decoder() if row.router == "tag" else None
    return scores, carried


def pretrain_for_init(
    seed: int, data: DAESynData, settings: TrainSettings, on_steps: Callable[[int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Paper A 4.3's first phase: the tag row of this seed, trained for as many steps."""
    return run_row(Row("tag"), seed, data, settings, on_steps=on_steps)[1]


def summarize(per_seed: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Mean over seeds; loss_sem is the standard error of the mean loss (None for one seed)."""
    n = len(per_seed)
    losses = [s["loss"] for s in per_seed]
    return {
        "loss": float(torch.tensor(losses, dtype=torch.float64).mean()),
        "loss_sem": sem(losses),
        "focus": sum(s["focus"] for s in per_seed) / n,
        "cover": sum(s["cover"] for s in per_seed) / n,
        "seeds": n,
    }
