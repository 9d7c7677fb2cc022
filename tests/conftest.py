"""Tiny randomly initialised models and batches: nothing is downloaded."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import hf_condroute  # noqa: F401  (registers the PEFT types)

VOCAB = 50


def t5_config(**overrides) -> T5Config:
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    values.update(overrides)
    return T5Config(**values)


def bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def make_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config(**overrides)).eval()


def make_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**overrides)).eval()


def llama_values(**overrides) -> dict:
    """The tiny Llama's config values (also those of Llama-like architectures, e.g. Mistral)."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return values


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**llama_values(**overrides))).eval()


def t5_batch(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0  # one padded example
    input_ids[0, 5:] = 0
    labels = torch.randint(2, VOCAB, (batch, 5), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def bert_batch(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    labels = torch.randint(0, 3, (batch,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def llama_batch(batch: int = 4, seed: int = 1) -> dict:
    """Left-padded, as a causal LM is fed for generation."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    input_ids[1, :3] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def top_k_for(router: str) -> int:
    return 2 if router == "moesart" else 1


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
        yield


def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _seeded_module():
    """Each test file's fixtures and each test start from the same random state, whichever files and tests ran
    before on the same worker (pytest-xdist hands files to workers in an order that varies from run to run)."""
    _seed_everything()


@pytest.fixture(autouse=True)
def _seeded_test(_seeded_module):
    _seed_everything()


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One torch thread for the tiny models of the tests: threads only add overhead there, and on a shared machine
    they make the tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
