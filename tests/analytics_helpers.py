"""Tiny routed models and data for the analytics tests (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

import hf_condroute  # noqa: F401  (registers the PEFT types)
from hf_condroute import RoutedAdapterConfig

PAD, EOS, VOCAB = 0, 1, 24


def tiny_t5_model(router: str = "tag", num_experts: int = 2, **kwargs):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    cfg = RoutedAdapterConfig(
        num_experts=num_experts, adapter_dim=4, router=router, task_type="SEQ_2_SEQ_LM", **kwargs
    )
    return get_peft_model(T5ForConditionalGeneration(config), cfg)


def tiny_bert_model(router: str = "top_k", num_experts: int = 3, **kwargs):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    cfg = RoutedAdapterConfig(num_experts=num_experts, adapter_dim=4, router=router, task_type="SEQ_CLS", **kwargs)
    return get_peft_model(BertForSequenceClassification(config), cfg)


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
