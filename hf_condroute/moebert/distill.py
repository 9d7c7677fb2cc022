"""Self-distillation of a routed FFN model: with its adapters disabled the PEFT model is the dense teacher.

loss = task loss + distill_coef * (sum over layers of MSE(student hidden, teacher hidden)
                                   + KL(teacher || student) on the logits, or MSE for regression)

For question answering (outputs with `start_logits` / `end_logits`) the logit term is the mean of the KL of the
start and of the end distributions over each window's tokens, as the task loss averages the two.

as MoEBERT (Zuo et al. 2022, eq. 7) distils BERT into its MoE version. Hidden states are compared on
non-padding tokens; the embedding output, which no routed FFN touches, is left out.

The teacher runs first: the core keeps each forward's routing state until the next forward (gradient
checkpointing recomputes routed blocks during backward), so the student's forward must be the last one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..block.api import routing_loss
from . import modes


def teacher_outputs(model: nn.Module, inputs: Mapping[str, Any], eval_mode: bool = True):
    """The dense teacher's outputs (with hidden states) on `inputs`: adapters disabled, no gradient, and by default
    in eval mode (no dropout; False where the caller already is). Call it before the student's forward."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"teacher_outputs needs the PEFT model (with `disable_adapter()`), got {type(model).__name__}. Pass the "
            "model `get_peft_model` returned."
        )
    with torch.no_grad(), model.disable_adapter():
        if eval_mode:
            with modes.eval_mode(model):
                return model(**inputs, output_hidden_states=True)
        return model(**inputs, output_hidden_states=True)


def _hidden_states(outputs) -> list[tuple[str, tuple]]:
    found = []
    for side, key in (
        ("self", "hidden_states"),
        ("encoder", "encoder_hidden_states"),
        ("decoder", "decoder_hidden_states"),
    ):
        states = getattr(outputs, key, None) if not isinstance(outputs, Mapping) else outputs.get(key)
        if states is not None:
            found.append((side, states))
    return found


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, L)
    if mask is None:
        return err.mean()
    m = mask[:, -err.shape[1] :].to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1.0)


def hidden_state_loss(student, teacher, attention_mask=None, decoder_attention_mask=None) -> torch.Tensor:
    """Sum over layers (embedding output excluded) of the MSE between student and teacher hidden states, averaged
    over non-padding tokens and features."""
    s_states, t_states = _hidden_states(student), _hidden_states(teacher)
    if not s_states or len(s_states) != len(t_states):
        raise ValueError(
            "Both student and teacher outputs need hidden states: call the model with output_hidden_states=True."
        )
    total = None
    for (side, s), (_, t) in zip(s_states, t_states):
        mask = decoder_attention_mask if side == "decoder" else attention_mask
        for s_layer, t_layer in zip(s[1:], t[1:]):
            term = _masked_mse(s_layer, t_layer, mask)
            total = term if total is None else total + term
    return total if total is not None else s_states[0][1][0].new_zeros(())


def logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    regression: bool | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions times temperature^2, averaged over examples (or over
    positions where `mask` is set, for per-token logits); MSE when `regression` (default: a single output)."""
    if regression is None:
        regression = student_logits.shape[-1] == 1
    s, t = student_logits.float(), teacher_logits.float()
    if regression:
        return F.mse_loss(s, t)
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="none",
        ).sum(dim=-1)
        * temperature**2
    )
    if mask is not None and mask.numel() == kl.numel():
        m = mask.reshape(-1).to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1.0)
    return kl.mean()


def span_logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) of a span-boundary distribution (QA start or end logits, (batch, length)) over each
    window's non-padding tokens, times temperature^2, averaged over windows."""
    s, t = student_logits.float(), teacher_logits.float()
    if attention_mask is not None:
        pad = attention_mask[:, -s.shape[1] :] == 0
        # both sides get (near) zero probability on padding, where the KL then adds exactly 0
        s, t = s.masked_fill(pad, torch.finfo(s.dtype).min), t.masked_fill(pad, torch.finfo(t.dtype).min)
    return logit_loss(s, t, regression=False, temperature=temperature)


SPAN_LOGITS = ("start_logits", "end_logits")


def distillation_loss(
    student,
    teacher,
    attention_mask: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    regression: bool | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """MoEBERT's distillation term (without the task loss): hidden-state MSE of every layer plus the logit KL
    (or MSE for regression). Per-token logits (token classification, seq2seq, LM) are compared where `labels` is
    not -100, else where the attention mask is set; question answering's start and end logits by
    `span_logit_loss`, their mean."""
    loss = hidden_state_loss(student, teacher, attention_mask, decoder_attention_mask)
    s_logits = getattr(student, "logits", None)
    t_logits = getattr(teacher, "logits", None)
    if s_logits is not None and t_logits is not None:
        mask = None
        if s_logits.dim() == 3:
            if labels is not None and labels.shape == s_logits.shape[:2]:
                mask = labels != -100
            else:
                mask = decoder_attention_mask if decoder_attention_mask is not None else attention_mask
        loss = loss + logit_loss(s_logits, t_logits, regression, temperature, mask)
    spans = [k for k in SPAN_LOGITS if getattr(student, k, None) is not None and getattr(teacher, k, None) is not None]
    if spans:
        kl = [span_logit_loss(getattr(student, k), getattr(teacher, k), attention_mask, temperature) for k in spans]
        loss = loss + sum(kl) / len(kl)
    return loss


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that distils the dense model into its routed FFN version (MoEBERT).

    The model must be the PEFT model of a `RoutedFFNConfig`: with adapters disabled it is its own teacher. Each
    training step runs the teacher (no gradient, eval mode), then the student with hidden states, and minimises
    task loss (with the routing auxiliary losses) + distill_coef * `distillation_loss`. Without labels the task loss
    is left out (labels are `labels`, or what the Trainer's `label_names` says: QA's start and end positions).
    Evaluation uses the plain task loss, so evaluation losses compare with the dense model's.
    """

    def __init__(
        self,
        *args,
        distill_coef: float = 1.0,
        distill_temperature: float = 1.0,
        regression: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if distill_coef < 0:
            raise ValueError(f"distill_coef must be >= 0, got {distill_coef}.")
        self.distill_coef = distill_coef
        self.distill_temperature = distill_temperature
        self.regression = regression
        # the loss is a per-batch mean: the Trainer divides it by the gradient accumulation steps
        self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        teacher = teacher_outputs(self.accelerator.unwrap_model(model), inputs)
        student_inputs = {**inputs, "output_hidden_states": True}
        if any(inputs.get(name) is not None for name in {"labels", *self.label_names}):  # or QA's start/end positions
            task, outputs = super().compute_loss(model, student_inputs, return_outputs=True)
        else:
            outputs = model(**student_inputs)
            task = routing_loss(self.accelerator.unwrap_model(model))
        distill = distillation_loss(
            outputs,
            teacher,
            attention_mask=inputs.get("attention_mask"),
            decoder_attention_mask=inputs.get("decoder_attention_mask"),
            labels=inputs.get("labels"),
            regression=self.regression,
            temperature=self.distill_temperature,
        )
        loss = task + self.distill_coef * distill.to(task.dtype)
        return (loss, outputs) if return_outputs else loss
