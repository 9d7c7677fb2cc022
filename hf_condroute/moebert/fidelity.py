"""How far a routed FFN model is from its dense self: the same inputs through the PEFT model with adapters
disabled (the dense teacher) and enabled, compared layer by layer (`hidden_state_gap`) and at the output logits
(`logit_gap`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn

from .distill import SPAN_LOGITS, _hidden_states, teacher_outputs
from .modes import eval_mode


def _layers(outputs, inputs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(side, hidden state, non-padding mask) of every layer's output: the encoder's (or the model's), then the
    decoder's. The embedding output is left out: routing does not change it."""
    out = []
    for side, states in _hidden_states(outputs):
        mask = inputs.get("decoder_attention_mask") if side == "decoder" else inputs.get("attention_mask")
        for h in states[1:]:
            m = (
                torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
                if mask is None
                else mask[:, -h.shape[1] :].bool()
            )
            out.append((side, h.float(), m))
    return out


def _mean_pooled_last(layers) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over non-padding tokens of the first side's last layer (a sentence embedding), and the token mask."""
    side = layers[0][0]
    _, h, m = [layer for layer in layers if layer[0] == side][-1]
    w = m.unsqueeze(-1).float()
    return (h * w).sum(1) / w.sum(1).clamp(min=1), m


@torch.no_grad()
def hidden_state_gap(model: nn.Module, dataloader: Iterable, max_batches: int | None = None) -> dict:
    """Hidden-state distance between the routed model and the dense one (adapters disabled) over non-padding
    tokens, in eval mode, on the batches of `dataloader` (dicts of model inputs).

    Returns:
        relative_error: per layer output, sum ||h_routed - h_dense||^2 / sum ||h_dense||^2, averaged over layers;
        relative_error_per_layer: the same per layer (encoder, or the model's, layers first, then decoder);
        mse: per layer the mean squared error per feature (what distillation minimises), averaged over layers;
        pooled_cosine: cosine similarity of routed and dense mean-pooled last (encoder) hidden states, i.e. of
            sentence embeddings, averaged over examples;
        tokens, examples: the data it saw.
    """
    device = next(model.parameters()).device
    diff_sq = ref_sq = counts = None
    cosine, examples, tokens, batches = 0.0, 0, 0, 0
    with eval_mode(model):
        for batch in dataloader:
            if max_batches is not None and batches >= max_batches:
                break
            inputs = send_to_device(dict(batch), device)
            dense = _layers(teacher_outputs(model, inputs, eval_mode=False), inputs)
            routed = _layers(model(**inputs, output_hidden_states=True), inputs)
            if not routed:
                raise ValueError("The model returned no hidden states: hidden_state_gap needs output_hidden_states.")
            d = torch.stack([((r - t).pow(2).sum(-1) * m).sum() for (_, r, m), (_, t, _) in zip(routed, dense)])
            t = torch.stack([(t.pow(2).sum(-1) * m).sum() for _, t, m in dense])
            c = torch.stack([m.sum() * r.shape[-1] for _, r, m in routed]).float()
            diff_sq, ref_sq, counts = (d, t, c) if diff_sq is None else (diff_sq + d, ref_sq + t, counts + c)
            pooled_r, mask = _mean_pooled_last(routed)
            pooled_t, _ = _mean_pooled_last(dense)
            cosine += F.cosine_similarity(pooled_r, pooled_t, dim=-1).sum().item()
            examples += pooled_r.shape[0]
            tokens += int(mask.sum())
            batches += 1
    if batches == 0:
        raise ValueError("The dataloader gave no batch: nothing to compare.")
    per_layer = (diff_sq / ref_sq).tolist()
    return {
        "relative_error": sum(per_layer) / len(per_layer),
        "relative_error_per_layer": per_layer,
        "mse": float((diff_sq / counts).mean()),
        "pooled_cosine": cosine / examples,
        "tokens": tokens,
        "examples": examples,
    }


def _logit_rows(key: str, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The distributions of one logit output as rows (examples, or tokens, or QA windows), over the last axis."""
    logits = logits.float()
    if key in SPAN_LOGITS:  # a window's distribution over its tokens: padding gets no probability
        return (
            logits
            if mask is None
            else logits.masked_fill(mask[:, -logits.shape[1] :] == 0, torch.finfo(logits.dtype).min)
        )
    if logits.dim() == 3:  # per-token logits: the non-padding tokens
        keep = (
            mask[:, -logits.shape[1] :].bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool)
        )
        return logits[keep.to(logits.device)]
    return logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def logit_gap(model: nn.Module, dataloader: Iterable, max_batches: int | None = None) -> dict:
    """How far the routed model's output logits are from the dense model's (adapters disabled), in eval mode.

    For each logit output the model gives (`logits`; for question answering `start_logits` and `end_logits`,
    each a distribution over a window's non-padding tokens):
        kl: mean over rows (examples, tokens or windows) of KL(dense || routed) of the softmax distributions;
        top1_agreement: share of rows where both pick the same class / token;
        rows: how many rows. A single-output regression head gets `mse` instead of both.
    """
    device = next(model.parameters()).device
    sums: dict = {}
    batches = 0
    with eval_mode(model):
        for batch in dataloader:
            if max_batches is not None and batches >= max_batches:
                break
            inputs = send_to_device(dict(batch), device)
            dense = teacher_outputs(model, inputs, eval_mode=False)
            routed = model(**inputs)
            for key in ("logits", *SPAN_LOGITS):
                r, d = getattr(routed, key, None), getattr(dense, key, None)
                if r is None or d is None:
                    continue
                regression = key == "logits" and r.shape[-1] == 1
                acc = sums.setdefault(key, {"kl": 0.0, "agree": 0.0, "sq": 0.0, "rows": 0, "regression": regression})
                if regression:
                    acc["sq"] += float((r.float() - d.float()).pow(2).sum())
                    acc["rows"] += r.numel()
                    continue
                r, d = (
                    _logit_rows(key, r, inputs.get("attention_mask")),
                    _logit_rows(key, d, inputs.get("attention_mask")),
                )
                kl = F.kl_div(F.log_softmax(r, -1), F.log_softmax(d, -1), log_target=True, reduction="none").sum(-1)
                acc["kl"] += float(kl.sum())
                acc["agree"] += float((r.argmax(-1) == d.argmax(-1)).sum())
                acc["rows"] += r.shape[0]
            batches += 1
    if batches == 0:
        raise ValueError("The dataloader gave no batch: nothing to compare.")
    if not sums:
        raise ValueError("The model returned no `logits`, `start_logits` or `end_logits`: nothing to compare.")
    return {
        key: {"mse": acc["sq"] / acc["rows"], "rows": acc["rows"]}
        if acc["regression"]
        else {"kl": acc["kl"] / acc["rows"], "top1_agreement": acc["agree"] / acc["rows"], "rows": acc["rows"]}
        for key, acc in sums.items()
    }
