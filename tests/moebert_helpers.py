"""Tiny BERT and T5 models with a 16-neuron FFN, and random neuron importance, for the MoEBERT tuner tests."""

from __future__ import annotations

import torch
from transformers import BertForSequenceClassification, T5ForConditionalGeneration

from hf_condroute.moebert import find_ffns

from .conftest import make_bert, make_t5

FFN = 16  # intermediate size of the tiny models


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    # initializer_range 0.3: an FFN that matters, so routing errors show in the hidden states
    return make_bert(
        seed,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=FFN,
        initializer_range=0.3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def tiny_t5(gated: bool, seed: int = 0) -> T5ForConditionalGeneration:
    return make_t5(
        seed,
        d_model=8,
        d_ff=FFN,
        d_kv=4,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def random_scores(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(parts.ffn_dim, generator=g) for name, parts in find_ffns(model).items()}
