"""The discrete autoencoder of paper A's DAE-Syn, scaled for a CPU.

conv encoder -> features (B, F) -> four parallel routed blocks, one per factor, each a core `RoutedBlock`
(a core router on the features + an `EmbeddingBank` of 8 vectors) -> sum of the chosen vectors (B, E) ->
transposed-conv decoder -> image. The layer pattern is the paper code's (kernel-4 stride-2 convs with BatchNorm
and ReLU, a Linear to the features, BatchNorm + Linear routers, Linear to a small map, transposed convs, a 1x1
transposed conv to RGB); only the widths and the image size are smaller (see `DAEConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_condroute import EmbeddingBank, RoutedBlock, RoutingConfig, RoutingInputs, RoutingStep, build_router

from .data import FACTORS, NUM_VALUES


@dataclass(frozen=True)
class DAEConfig:
    """Sizes. The paper's code: 64x64 images, widths (128, 256, 512, 1024), features 500, embeddings 32.

    The encoder halves the image once per width (64 -> 4 in the paper); the decoder starts from a map one
    doubling larger (8x8 in the paper) and runs the widths backwards, one transposed conv per doubling.
    """

    image_size: int = 32
    widths: tuple[int, ...] = (8, 16, 32, 64)
    feature_dim: int = 128  # router input
    embed_dim: int = 32  # the subnetworks' vectors (the paper's decoder input: 4 x 8 one-hots)

    def __post_init__(self):
        if len(self.widths) < 2 or self.image_size % 2 ** len(self.widths):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**{len(self.widths)} (one halving per width of "
                f"widths={self.widths}, at least two widths); use 32 or 64."
            )

    @property
    def encoder_side(self) -> int:
        return self.image_size // 2 ** len(self.widths)


def conv_stage(cin: int, cout: int, transposed: bool = False) -> nn.Sequential:
    """Kernel 4, stride 2, padding 1: halves (or, transposed, doubles) the side. No bias before a BatchNorm."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(conv(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DiscreteAutoencoder(nn.Module):
    """forward(images, tags, keys, step) -> reconstructions. `routing[i]` configures the block of factor i
    (its `tag_group` must be i, so tag routing and tag supervision read that factor's column of the tags)."""

    def __init__(self, routing: Sequence[RoutingConfig], config: DAEConfig = DAEConfig()):
        super().__init__()
        if len(routing) != len(FACTORS):
            raise ValueError(f"Give one RoutingConfig per factor ({len(FACTORS)}), got {len(routing)}.")
        self.config = config
        w, side = config.widths, config.encoder_side
        stages = [conv_stage(cin, cout) for cin, cout in zip((3, *w[:-1]), w)]
        self.encoder = nn.Sequential(*stages, nn.Flatten(), nn.Linear(w[-1] * side * side, config.feature_dim))
        blocks = []
        for group, (factor, cfg) in enumerate(zip(FACTORS, routing)):
            if cfg.tag_group != group:
                raise ValueError(f"The block of factor {factor!r} needs tag_group={group}, got {cfg.tag_group}.")
            if cfg.num_experts != NUM_VALUES:
                raise ValueError(f"Each factor has {NUM_VALUES} values: use num_experts={NUM_VALUES}.")
            cfg.validate_routing()
            router = build_router(cfg, config.feature_dim, factor)
            blocks.append(RoutedBlock(router, EmbeddingBank(router.num_experts, config.embed_dim), name=factor))
        self.blocks = nn.ModuleList(blocks)
        rev, start = w[::-1], 2 * side
        self.decoder = nn.Sequential(
            nn.Linear(config.embed_dim, rev[0] * start * start),
            nn.Unflatten(1, (rev[0], start, start)),
            *[conv_stage(cin, cout, transposed=True) for cin, cout in zip(rev, rev[1:])],
            nn.ConvTranspose2d(rev[-1], 3, 1),
        )

    def forward(
        self,
        images: torch.Tensor,
        tags: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        step: RoutingStep | None = None,
    ) -> torch.Tensor:
        features = self.encoder(images)
        inputs = RoutingInputs(tags=tags, keys=keys, step=step)
        code = sum(block(features, inputs) for block in self.blocks)
        return self.decoder(code)

    def subnetworks_and_decoder(self) -> dict[str, torch.Tensor]:
        """The state paper A 4.3 carries over from tag routing: the expert vectors and the decoder."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("decoder.") or ".experts." in k}


def routing_configs(router: str, **overrides) -> list[RoutingConfig]:
    """One RoutingConfig per factor block, differing only in `tag_group`."""
    base = RoutingConfig(router=router, num_experts=NUM_VALUES, **overrides)
    return [dataclasses.replace(base, tag_group=group) for group in range(len(FACTORS))]
