"""Checkpoints written by hf_condroute 0.1.0 (tests/fixtures/v0_1_0, made by tests/fixtures/make_v0_1_0.py from
the 0.1.0 tree) load with today's code and give the same outputs, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, BertForSequenceClassification, T5ForConditionalGeneration

import hf_condroute  # noqa: F401  (registers the PEFT types)

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_0"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_the_fixtures_are_there():
    assert {"t5_adapter_top_k", "t5_adapter_reinforce_token", "bert_adapter_x_moe", "bert_ffn_moesart"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_a_0_1_0_checkpoint_loads_and_gives_the_same_outputs(case):
    folder = FIXTURES / case
    model_type = AutoConfig.from_pretrained(folder / "base").model_type
    cls = T5ForConditionalGeneration if model_type == "t5" else BertForSequenceClassification
    base = cls.from_pretrained(folder / "base")
    model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    saved = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert model.peft_config["default"].router == saved["router"]
    expected = torch.load(folder / "expected.pt")
    with torch.no_grad():
        logits = model(**expected["batch"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
