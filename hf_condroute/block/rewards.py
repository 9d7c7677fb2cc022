"""Each example's own task loss, from a transformers model's logits and labels: REINFORCE's reward is minus it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..architectures import is_causal_lm


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, model=None) -> torch.Tensor:
    """Loss of every example (B,), matching what transformers' heads average.

    Token-level heads (B, L, V) with labels (B, L): mean cross-entropy over labelled tokens, shifted by one for
    causal language models. Sequence heads (B, C): cross-entropy for integer labels, squared error for
    regression (C = 1, float labels), binary cross-entropy averaged over labels for multi-label float targets.
    """
    config = getattr(model, "config", None)
    logits = logits.float()
    if logits.dim() == 3:
        if is_causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        return mean_over_labelled(token_losses(logits, labels), labels)
    if logits.dim() == 2:
        if logits.shape[-1] == 1 and (
            labels.is_floating_point() or getattr(config, "problem_type", None) == "regression"
        ):
            return (logits.squeeze(-1) - labels.float().view(-1)) ** 2
        if labels.is_floating_point() and labels.shape == logits.shape:
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
        return F.cross_entropy(logits, labels.long().view(-1), ignore_index=-100, reduction="none")
    raise ValueError(
        f"Cannot compute a per-example loss from logits of shape {tuple(logits.shape)} and labels of shape "
        f"{tuple(labels.shape)}. Call `hf_condroute.set_reward(model, per_example_loss)` before backward() instead."
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every token (B, L) in float32, 0 where the label is -100."""
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten().long(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    ).view(labels.shape)


def mean_over_labelled(token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean token loss (B,) over its labelled tokens."""
    return token_loss.sum(dim=1) / labels.ne(-100).sum(dim=1).clamp(min=1)
