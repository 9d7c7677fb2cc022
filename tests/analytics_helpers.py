"""Routed tiny models (from conftest's configs, one layer each side), tagged data and hand-made decisions for the
analytics tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import T5ForConditionalGeneration

from hf_condroute import RoutedAdapterConfig
from hf_condroute.routers.base import RoutingDecision

from .conftest import VOCAB, make_bert, make_t5

PAD, EOS = 0, 1


def tiny_t5() -> T5ForConditionalGeneration:
    return make_t5(num_layers=1, num_decoder_layers=1).train()


def tiny_t5_model(router: str = "tag", num_experts: int = 2, **kwargs):
    """4 routed blocks: encoder and decoder self-attention and feed-forward."""
    cfg = RoutedAdapterConfig(num_experts=num_experts, adapter_dim=4, router=router, task_type="SEQ_2_SEQ_LM", **kwargs)
    return get_peft_model(tiny_t5(), cfg)


def tiny_bert_model(router: str = "top_k", num_experts: int = 3, **kwargs):
    cfg = RoutedAdapterConfig(num_experts=num_experts, adapter_dim=4, router=router, task_type="SEQ_CLS", **kwargs)
    return get_peft_model(make_bert(num_hidden_layers=1).train(), cfg)


def tagged_seq2seq(n: int, num_tags: int = 2, seed: int = 0) -> Dataset:
    """Tag t: the target is the input shifted by t (mod the vocabulary); the tag is the routing tag."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        tag = i % num_tags
        seq = torch.randint(2, VOCAB, (5,), generator=g)
        target = ((seq - 2 + tag) % (VOCAB - 2) + 2).tolist()
        rows.append({"input_ids": seq.tolist() + [EOS], "labels": target + [EOS], "routing_tags": tag})
    return Dataset.from_list(rows)


def collate(features: list[dict]) -> dict:
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([torch.tensor(f["input_ids"]) for f in features], batch_first=True, padding_value=PAD)
    labels = pad([torch.tensor(f["labels"]) for f in features], batch_first=True, padding_value=-100)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD).long(),
        "labels": labels,
        "routing_tags": torch.tensor([f["routing_tags"] for f in features]),
    }


def decision(experts, num_experts=None, probs=None) -> RoutingDecision:
    """A RoutingDecision from nested lists: uniform probabilities over `num_experts` unless `probs` is given."""
    experts = torch.tensor(experts)
    if probs is None:
        probs = torch.full((*experts.shape[:-1], num_experts), 1.0 / num_experts)
    return RoutingDecision(experts=experts, weights=(experts >= 0).float(), probs=torch.as_tensor(probs))
