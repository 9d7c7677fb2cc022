"""A `compute_loss_func` for `transformers.Trainer` that keeps routing's auxiliary losses and REINFORCE rewards.

When the Trainer computes the loss itself (label smoothing, or any `compute_loss_func`) it pops `labels`
before the forward, so the routed model's hooks can neither add the auxiliary routing losses to
`outputs.loss` nor compute REINFORCE's per-example reward. This loss does both after the forward:

    trainer = Trainer(..., compute_loss_func=RoutedTokenLoss(model, label_smoothing=0.1))

It returns what the Trainer expects from a `compute_loss_func`: the sum of token losses divided by
`num_items_in_batch` (the labelled tokens of the whole accumulated batch, over all processes), so gradient
accumulation and `average_tokens_across_devices` stay exact. The routing losses, which are per-batch means,
get this micro-batch's share of those tokens as their weight, so they too average over the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..block.api import routing_loss, set_reward
from ..block.context import ModelRoutingState
from ..block.rewards import mean_over_labelled, token_losses


class RoutedTokenLoss:
    """Label-smoothed token cross-entropy (as transformers' `LabelSmoother`) plus the routing losses of the
    forward it follows; sets REINFORCE's reward to minus each example's mean token loss.

    Args:
        model: the routed model the Trainer trains (a `PeftModel`; the unwrapped one, not a DDP wrapper).
        label_smoothing: epsilon, e.g. `training_args.label_smoothing_factor`.
        shift_labels: predict token t+1 from position t (causal language models); False for seq2seq.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, shift_labels: bool = False):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if ModelRoutingState.find(model) is None:
            raise ValueError(
                "RoutedTokenLoss needs a routed model (built with `get_peft_model(model, RoutedAdapterConfig(...))`); "
                "for a model without routing use the Trainer's own loss."
            )
        self.model = model
        self.label_smoothing = label_smoothing
        self.shift_labels = shift_labels

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("RoutedTokenLoss needs `labels` in every batch: the data collator must provide them.")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(
                f"RoutedTokenLoss expects token logits (batch, length, vocab) and labels (batch, length), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}."
            )
        token_loss = token_losses(logits, labels, self.label_smoothing)
        tokens = labels.ne(-100).sum()
        if num_items_in_batch is None:
            loss, share = token_loss.sum() / tokens.clamp(min=1), 1.0
        else:
            loss = token_loss.sum() / num_items_in_batch
            share = tokens / num_items_in_batch
        if not (self.model.training and torch.is_grad_enabled()):
            return loss
        set_reward(self.model, mean_over_labelled(token_loss.detach(), labels))
        return loss + routing_loss(self.model) * share
