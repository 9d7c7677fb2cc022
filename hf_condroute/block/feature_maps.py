"""Conv experts: routed bottlenecks of 1x1 convolutions on channels-first feature maps (batch, C, height, width).

A bottleneck of 1x1 convolutions, up(act(down(x))), is one linear bottleneck applied at every pixel, so conv
experts are an `AdapterBank` run on the map viewed as rows (batch, height * width, C), and routing per example on
the spatial mean is the routed block's `masked_mean` over the height * width positions. Parameter names and shapes
are the adapter bank's; expert e's convolutions are

    down: weight down_weight[e].T[:, :, None, None]  (adapter_dim, C, 1, 1), bias down_bias[e]  (adapter_dim,)
    up:   weight up_weight[e].T[:, :, None, None]    (C, adapter_dim, 1, 1), bias up_bias[e]    (C,)

(the up projection zero-initialised by default, so an untrained expert adds nothing). A map in `channels_last`
memory format is viewed as rows without a copy; a contiguous NCHW map is copied once. Per-token routing (one
decision per pixel) is not offered: a block on a feature map routes per example.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .routed_block import RoutedBlock, RoutingInputs


def feature_map_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C), a view when x is channels_last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def rows_to_feature_map(rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H * W, C) -> (B, C, H, W) (a channels_last view of the rows)."""
    return rows.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def check_feature_map(x, channels: int, where: str) -> None:
    """A clear error unless x is a (batch, channels, height, width) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"Conv experts of {where} take a feature map (batch, {channels}, height, width), but it outputs {got}. "
            "Target modules whose output is a channels-first map (a Conv2d, a residual block), or set "
            "`feature_channels` to the channels the module outputs."
        )


def route_feature_map(block: RoutedBlock, x: torch.Tensor, inputs: RoutingInputs | None = None) -> torch.Tensor:
    """The routed block's output on a feature map x (B, C, H, W), shaped like x: each example routes on its spatial
    mean; attention masks do not apply to pixels and are ignored."""
    if block.granularity != "example":
        raise ValueError(
            f"Block {block.name or '<unnamed>'} runs conv experts on a feature map, which route per example (on the "
            "spatial mean); routing_granularity='token' would route every pixel. Use routing_granularity='example'."
        )
    check_feature_map(x, block.experts.in_features, block.name or "<unnamed>")
    inputs = replace(inputs, mask=None) if inputs is not None else None
    out = block(feature_map_rows(x), inputs)
    return rows_to_feature_map(out, x.shape[2], x.shape[3])
