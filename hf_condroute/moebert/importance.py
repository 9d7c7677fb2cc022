"""MoEBERT's neuron importance (Zuo et al. 2022, eq. 5, after Molchanov et al. 2019): for FFN neuron j,

    I_j = sum over batches of | sum_{w in W_in[j, :], b_in[j], W_out[:, j]} w * dL/dw |

the first-order estimate of how much the loss changes when the neuron is removed, with the absolute value
taken per batch and summed over the data, as MoEBERT's code does. Gated FFNs count both input rows.

A quantized base (bitsandbytes 4-/8-bit) has no floating-point weights to differentiate. There the same sums come
from activations: over an input row, sum_i w_ji dL/dw_ji + b_j dL/db_j = sum_t z_j(t) dL/dz_j(t), z the input
projection's output at token t; over an output column, sum_i w_ij dL/dw_ij = sum_t a_j(t) dL/da_j(t), a the output
projection's input. The weights they use are the dequantized ones the layers compute with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from ..experts.quantized import is_quantized
from .layout import FFNLayout, FFNParts, find_ffns
from .modes import eval_mode


def _task_loss(model: nn.Module, batch) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"importance_scores feeds each batch to the model as keyword arguments, but got a {type(batch).__name__}. "
            "Use a collator that returns a dict, or pass loss_fn=lambda model, batch: ... ."
        )
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss, and importance scores are gradients of one. Give batches with `labels`, or "
            "pass loss_fn=lambda model, batch: <scalar loss> (e.g. a contrastive loss for an embedding model)."
        )
    return loss


def importance_scores(
    model: nn.Module,
    dataloader: Iterable,
    *,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    max_batches: int | None = None,
    target_modules=None,
    layout: FFNLayout | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Importance of every FFN neuron of a dense model, accumulated over `dataloader`.

    Returns {FFN entry module name: float32 CPU tensor (ffn_dim,)}, in model order: pass it as
    `RoutedFFNConfig(importance=...)`. The model runs in eval mode (no dropout) and its parameters, their
    `requires_grad` flags and `.grad` are left as they were.

    loss_fn: (model, batch) -> scalar loss; default: the model's own loss on `model(**batch)` (batches need labels).
    max_batches: stop after this many batches.
    target_modules / layout: which FFNs and where their pieces are, for architectures without a default
        (see `RoutedFFNConfig.ffn_in_proj`); `layout.entry` is ignored.
    """
    ffns = find_ffns(model, target_modules, layout)
    if any(is_quantized(m) for parts in ffns.values() for m in (*parts.in_proj, parts.out_proj)):
        return _importance_from_activations(model, ffns, dataloader, loss_fn, max_batches, progress)
    tracked: list[list[nn.Parameter]] = []
    for parts in ffns.values():
        inputs = [p for proj in parts.in_proj for p in (proj.weight, proj.bias) if p is not None]
        tracked.append(inputs + [parts.out_proj.weight])
    flat = [p for params in tracked for p in params]
    device = flat[0].device
    # summed on the model's device (no host sync per batch), returned on the CPU
    scores = {name: torch.zeros(parts.ffn_dim, dtype=torch.float32, device=device) for name, parts in ffns.items()}
    for batch in _scored_batches(model, dataloader, flat, device, max_batches, progress):
        with torch.enable_grad():
            loss = loss_fn(model, batch) if loss_fn is not None else _task_loss(model, batch)
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
        offset = 0
        for (name, parts), params in zip(ffns.items(), tracked):
            g = grads[offset : offset + len(params)]
            offset += len(params)
            scores[name] += _neuron_sums(parts.out_proj, params, g).abs().float()
    return {name: score.cpu() for name, score in scores.items()}


def _scored_batches(model, dataloader, trainable, device, max_batches, progress):
    """The batches to score, on `device`, with the model in eval mode and only `trainable` requiring gradients;
    every parameter's `requires_grad` is restored afterwards. A dataloader that gives no batch is an error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    seen = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        with eval_mode(model):
            total = max_batches if max_batches is not None else getattr(dataloader, "__len__", lambda: None)()
            for batch in tqdm(dataloader, total=total, disable=not progress, desc="importance"):
                if max_batches is not None and seen >= max_batches:
                    break
                seen += 1
                yield send_to_device(batch, device)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("The dataloader gave no batch: importance scores need data.")


def _neuron_sums(out_proj, params, grads) -> torch.Tensor:
    """sum of w * dL/dw over each neuron's input row(s) (weights and biases) and output column."""
    total = None
    for p, g in zip(params, grads):
        if g is None:
            continue
        prod = (p.detach() * g).float()
        if p is out_proj.weight:
            part = prod.sum(dim=0)  # (out, ffn_dim): a neuron's output column
        elif prod.dim() == 2:
            part = prod.sum(dim=1)  # (ffn_dim, in): a neuron's input row
        else:
            part = prod  # input bias (ffn_dim,)
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(out_proj.in_features, device=out_proj.weight.device)
    return total


def _importance_from_activations(model, ffns: dict[str, FFNParts], dataloader, loss_fn, max_batches, progress):
    """`importance_scores` through activations (see the module docstring): for quantized projections."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    scores = {name: torch.zeros(parts.ffn_dim, dtype=torch.float32, device=device) for name, parts in ffns.items()}
    # nothing but the activations needs a gradient
    for batch in _scored_batches(model, dataloader, [], device, max_batches, progress):
        acts: dict[str, list[torch.Tensor]] = {name: [] for name in ffns}

        def keep(name, t, acts=acts):
            if not t.requires_grad:  # the first FFN's input projection: nothing upstream needs a gradient
                t.requires_grad_(True)
            acts[name].append(t)

        handles = []
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Module):
            # inputs that need gradients from the start, as `enable_input_require_grads` makes them: a 4-bit
            # layer run without them in eval mode switches to bitsandbytes' CPU inference kernel for good
            handles.append(embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
        for name, parts in ffns.items():
            for proj in parts.in_proj:
                handles.append(proj.register_forward_hook(lambda m, i, out, name=name: keep(name, out)))
            handles.append(parts.out_proj.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
        try:
            with torch.enable_grad():
                loss = loss_fn(model, batch) if loss_fn is not None else _task_loss(model, batch)
        finally:
            for h in handles:
                h.remove()
        tensors = [t for name in ffns for t in acts[name]]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors and loss.requires_grad else []
        grads = iter(grads)
        for name in ffns:
            total_j = torch.zeros_like(scores[name])
            for t in acts[name]:
                g = next(grads)
                if g is not None:
                    total_j += (t.detach().float() * g.float()).reshape(-1, t.shape[-1]).sum(0)
            scores[name] += total_j.abs()
    return {name: score.cpu() for name, score in scores.items()}
