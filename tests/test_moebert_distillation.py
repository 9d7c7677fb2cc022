"""MoEBERT distillation: the loss terms, an encoder-decoder student, and the DistillationTrainer."""

from __future__ import annotations

import warnings

import torch
from peft import get_peft_model

import hf_condroute
from hf_condroute import RoutedFFNConfig
from hf_condroute.moebert import (
    DistillationTrainer,
    distillation_loss,
    hidden_state_loss,
    logit_loss,
)

from .conftest import bert_batch, t5_batch
from .moebert_helpers import random_scores, tiny_bert, tiny_t5

# ----- distillation --------------------------------------------------------------------------------------


def test_distillation_loss_terms_match_their_definitions():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s_h = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    t_h = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    s_h[0] = t_h[0]
    student = SimpleNamespace(hidden_states=tuple(s_h), logits=torch.randn(2, 5, generator=g))
    teacher = SimpleNamespace(hidden_states=tuple(t_h), logits=torch.randn(2, 5, generator=g))
    expected_hidden = sum(((s - t) ** 2).mean(-1)[mask.bool()].mean() for s, t in zip(s_h[1:], t_h[1:]))
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask), expected_hidden)
    p_t = teacher.logits.softmax(-1)
    expected_kl = (p_t * (p_t.log() - student.logits.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(logit_loss(student.logits, teacher.logits), expected_kl)
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected_hidden + expected_kl)
    reg_s, reg_t = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    torch.testing.assert_close(logit_loss(reg_s, reg_t), ((reg_s - reg_t) ** 2).mean())


def test_distillation_loss_of_an_encoder_decoder_reaches_the_experts():
    from hf_condroute.moebert import teacher_outputs

    model = tiny_t5(gated=True)
    peft_model = get_peft_model(model, RoutedFFNConfig(num_experts=4, importance=random_scores(model))).train()
    batch = t5_batch()
    teacher = teacher_outputs(peft_model, batch)
    student = peft_model(**batch, output_hidden_states=True)
    loss = distillation_loss(student, teacher, batch["attention_mask"], labels=batch["labels"])
    # encoder and decoder layers both count: 1 + 1 hidden-state terms, plus the per-token KL where labels are set
    s_h, t_h = student.encoder_hidden_states[1], teacher.encoder_hidden_states[1]
    assert loss > hidden_state_loss(student, teacher, batch["attention_mask"]) > 0
    assert (
        hidden_state_loss(student, teacher, batch["attention_mask"])
        > ((s_h - t_h) ** 2).mean(-1)[batch["attention_mask"].bool()].mean()
    )
    loss.backward()
    encoder_bank = (
        peft_model.base_model.model.encoder.block[0].layer[1].DenseReluDense.routed_ffn_block["default"].experts
    )
    decoder_bank = (
        peft_model.base_model.model.decoder.block[0].layer[2].DenseReluDense.routed_ffn_block["default"].experts
    )
    assert encoder_bank.wi_gate.grad.abs().sum() > 0 and decoder_bank.wo.grad.abs().sum() > 0


def _trainer(peft_model, tmp_path, steps, dataset, **kwargs):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    return DistillationTrainer(model=peft_model, args=args, train_dataset=dataset, distill_coef=2.0)


def _dataset(n=16, labels=True):
    from datasets import Dataset

    b = bert_batch(batch=n, seed=7)
    columns = {k: v.tolist() for k, v in b.items() if labels or k != "labels"}
    return Dataset.from_dict(columns)


def test_distillation_trainer_brings_the_student_to_the_teacher(tmp_path):
    model = tiny_bert()
    batch = bert_batch(seed=99)
    with torch.no_grad():
        dense = model(**batch, output_hidden_states=True)
    peft_model = get_peft_model(
        model,
        RoutedFFNConfig(num_experts=4, top_k=1, router="top_k", importance=random_scores(model), task_type="SEQ_CLS"),
    )

    def gap():
        peft_model.eval()
        with torch.no_grad():
            out = peft_model(**batch, output_hidden_states=True)
        return hidden_state_loss(out, dense, batch["attention_mask"]).item()

    before = gap()
    _trainer(peft_model, tmp_path, 30, _dataset(labels=False)).train()  # distillation alone
    after = gap()
    print("gap", before, after)
    assert after < 0.5 * before, (before, after)
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(**batch).logits, dense.logits)  # the teacher did not move


def test_teacher_forward_keeps_the_students_routing_under_checkpointing(tmp_path):
    """The teacher runs first, so a checkpointed stochastic router recomputes with the student's routing state: the
    gradients match those without checkpointing, and the auxiliary losses are scaled like the loss."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert(dropout=0.1)
        peft_model = get_peft_model(
            model,
            RoutedFFNConfig(
                router="moesart", top_k=2, trimmed_lasso_coef=0.1, importance=random_scores(model), task_type="SEQ_CLS"
            ),
        )
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = _trainer(peft_model, tmp_path, 1, _dataset(4))
        peft_model.train()
        inputs = {k: v for k, v in bert_batch().items()}
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "auxiliary losses were not part of the loss" would fail here
            loss = trainer.compute_loss(peft_model, inputs)
            assert len(hf_condroute.last_step(peft_model).records) == 2  # the student's decisions, not the teacher's
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
