"""RoutedTokenLoss: with `labels` popped by the Trainer, routing losses and REINFORCE rewards still train."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers.trainer_pt_utils import LabelSmoother

import hf_condroute
from hf_condroute import RoutedAdapterConfig
from hf_condroute.integrations.trainer_loss import RoutedTokenLoss

from .conftest import VOCAB, make_t5


def routed_t5(router: str, **routing) -> torch.nn.Module:
    adapter = RoutedAdapterConfig(
        task_type="SEQ_2_SEQ_LM", num_experts=4, adapter_dim=4, router=router, init_weights=False, **routing
    )
    return get_peft_model(make_t5(), adapter)


def batch(model) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (6, 7), generator=g)
    labels = torch.randint(2, VOCAB, (6, 3), generator=g)
    labels[0, 2] = labels[3, 1:] = -100
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
        "routing_tags": torch.tensor([0, 1, 2, 3, -100, 1]),
    }
    return inputs, labels


def run(model, inputs, labels, loss_fn=None, num_items=None):
    """One forward and backward, the model's own way (labels in the forward) or the Trainer's (labels popped)."""
    model.zero_grad()
    torch.manual_seed(2)  # the same REINFORCE samples in both ways
    if loss_fn is None:
        loss = model(**inputs, labels=labels).loss
    else:
        loss = loss_fn(model(**inputs), labels, num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "router, routing",
    [
        ("reinforce", {"tag_supervision_coef": 0.5}),
        ("top_k", {"router_aux_loss_coef": 0.1, "router_z_loss_coef": 0.01, "tag_supervision_coef": 0.5}),
    ],
)
def test_same_loss_and_gradients_as_the_models_own_loss(router, routing):
    model = routed_t5(router, **routing)
    model.train()
    inputs, labels = batch(model)
    own_loss, own_grads = run(model, inputs, labels)
    loss_fn = RoutedTokenLoss(model)
    loss, grads = run(model, inputs, labels, loss_fn)
    assert hf_condroute.get_routing_losses(model)  # auxiliary terms were computed
    torch.testing.assert_close(loss, own_loss)
    router_grads = [n for n in grads if ".router." in n]
    assert router_grads and any(grads[n].abs().sum() > 0 for n in router_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], own_grads[name], msg=name)

    # REINFORCE's reward: minus each example's mean token loss (the same samples in both forwards)
    torch.manual_seed(3)
    logits = model(**inputs).logits
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    expected = -(per_token.sum(1) / (labels != -100).sum(1))
    torch.manual_seed(3)
    loss_fn(model(**inputs), labels)
    torch.testing.assert_close(hf_condroute.last_step(model).reward, expected.detach())


def test_a_micro_batch_weighs_by_its_share_of_the_accumulated_tokens():
    # num_items_in_batch = twice this batch's tokens (e.g. two accumulated micro-batches): every gradient halves
    model = routed_t5("reinforce", tag_supervision_coef=0.5)
    model.train()
    inputs, labels = batch(model)
    _, whole = run(model, inputs, labels, RoutedTokenLoss(model))
    _, half = run(model, inputs, labels, RoutedTokenLoss(model), num_items=2 * (labels != -100).sum())
    for name in whole:
        torch.testing.assert_close(half[name], whole[name] / 2, msg=name)


def test_label_smoothing_matches_transformers_label_smoother():
    model = routed_t5("top_k")
    model.eval()  # no routing losses in evaluation: the task loss alone
    inputs, labels = batch(model)
    with torch.no_grad():
        outputs = model(**inputs)
        ours = RoutedTokenLoss(model, label_smoothing=0.1)(outputs, labels)
        theirs = LabelSmoother(epsilon=0.1)(outputs, labels)
    torch.testing.assert_close(ours, theirs)


def test_needs_a_routed_model_and_labels():
    with pytest.raises(ValueError, match="routed model"):
        RoutedTokenLoss(make_t5())
    model = routed_t5("tag")
    with pytest.raises(ValueError, match="labels"):
        RoutedTokenLoss(model)(None, None)
