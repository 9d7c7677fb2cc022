"""The stock transformers.Trainer trains routed models from a dataset with a `routing_tags` column."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

import hf_condroute
from hf_condroute import RoutedAdapterConfig

from .conftest import VOCAB, make_bert, make_t5


def dataset(n: int, seq2seq: bool) -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(2, VOCAB, (6,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * 6, "routing_tags": i % 3, "text": "unused column"}
        row["labels"] = ids[::-1][:4] if seq2seq else i % 3
        rows.append(row)
    return Dataset.from_list(rows)


def run(model, data, tmp_path, steps=6):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    return trainer, changed


@pytest.mark.parametrize("router", ["tag", "reinforce"])
def test_trainer_trains_routed_t5_with_routing_tags_column(router, tmp_path):
    model = get_peft_model(
        make_t5(), RoutedAdapterConfig(num_experts=3, adapter_dim=8, router=router, task_type="SEQ_2_SEQ_LM")
    )
    data = dataset(48, seq2seq=True)
    trainer, changed = run(model, data, tmp_path)
    assert any("experts" in n for n in changed)
    if router == "reinforce":
        assert any(".router.network." in n for n in changed) and any(".baseline." in n for n in changed)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    if router == "tag":
        # the tag router raises without tags: training at all shows the Trainer passed the column through
        decisions = hf_condroute.get_routing(model)
        assert all(d.experts.shape == (8, 1) for d in decisions.values())


def test_trainer_trains_routed_bert_classifier(tmp_path):
    model = get_peft_model(
        make_bert(),
        RoutedAdapterConfig(
            num_experts=3, adapter_dim=8, router="top_k", tag_supervision_coef=1.0, task_type="SEQ_CLS"
        ),
    )
    data = dataset(48, seq2seq=False)
    trainer, changed = run(model, data, tmp_path, steps=12)
    assert any(".router." in n for n in changed) and any("classifier" in n for n in changed)
    # tag supervision pulled the routers towards the tags of the training data
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_trainer_keeps_routing_tags_column(tmp_path):
    model = get_peft_model(
        make_bert(), RoutedAdapterConfig(num_experts=3, adapter_dim=8, router="tag", task_type="SEQ_CLS")
    )
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "unused"), report_to=[], use_cpu=True)
    )
    kept = trainer._remove_unused_columns(dataset(4, seq2seq=False))
    assert "routing_tags" in kept.column_names and "text" not in kept.column_names
