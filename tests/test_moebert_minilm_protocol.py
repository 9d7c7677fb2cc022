"""The MiniLM Top-k vs MOESART protocol script: its t-tests and summary on fixed numbers, and a smoke run of the
whole protocol on a tiny random BERT (the real text, 2 distillation steps)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from .recipe_loader import load_recipe


@pytest.fixture(scope="module")
def protocol():
    return load_recipe("moebert_minilm_protocol", "benchmarks")


def test_ttests_one_sided_both_ways_on_fixed_numbers(protocol):
    # pooled variance 1, standard error sqrt(2/3), t = -3 / 0.8165 = -3.674 on 4 degrees of freedom
    t = protocol.ttests([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t["t"] == pytest.approx(-3.6742, abs=1e-4)
    assert t["p_moesart_lower"] == pytest.approx(0.010650, abs=1e-5)
    assert t["p_moesart_lower"] + t["p_top_k_lower"] == pytest.approx(1.0)
    assert protocol.ttests([1.0], [2.0, 3.0]) == {"p_moesart_lower": None, "p_top_k_lower": None, "t": None}


def test_summary_is_mean_and_standard_error_of_the_test_metrics(protocol):
    runs = [
        {"seed": s, "test": {"relative_error": e, "relative_error_last_layer": 2 * e, "pooled_cosine": 1 - e}}
        for s, e in enumerate([0.1, 0.2, 0.3])
    ]
    s = protocol.summarize(runs)
    assert s["seeds"] == [0, 1, 2] and s["errors"] == [0.1, 0.2, 0.3]
    assert s["relative_error"] == pytest.approx(0.2) and s["relative_error_sem"] == pytest.approx(0.1 / 3**0.5)
    assert s["relative_error_last_layer"] == pytest.approx(0.4) and s["pooled_cosine"] == pytest.approx(0.8)


def test_held_out_split_is_disjoint_and_complete(protocol):
    val, test = protocol.split_held_out(list(range(7)))
    assert val == [0, 2, 4, 6] and test == [1, 3, 5]


def test_protocol_smoke_run_on_a_tiny_bert(protocol, tmp_path):
    words = "the a of to is and in for be an it that this are with as by on or not if can".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    model_dir = tmp_path / "tiny"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    BertModel(config).save_pretrained(model_dir)
    argv = ["--model_path", str(model_dir), "--split", "8:0", "--steps", "2", "--lrs", "1e-3", "1e-2"]
    argv += ["--seeds", "2", "--importance_batches", "1", "--max_length", "16", "--output_dir", str(tmp_path)]
    argv += ["--stem", "smoke", "--scores_cache", str(tmp_path / "scores.pt")]
    results = protocol.main(argv)
    for router in ("top_k", "moesart"):
        m = results["summary"][router]
        assert m["tuned_lr"] in (1e-3, 1e-2) and m["seeds"] == [0, 1] and m["relative_error_sem"] is not None
        grid = results["grid"][router]
        assert [g["learning_rate"] for g in grid] == [1e-3, 1e-2]
        assert min(grid, key=lambda g: g["val"]["relative_error"])["learning_rate"] == m["tuned_lr"]
    assert 0.0 <= results["ttest"]["p_moesart_lower"] <= 1.0
    assert results["importance"]["cached"] is False and (tmp_path / "scores.pt").exists()
    assert json.loads((tmp_path / "smoke.json").read_text())["summary"].keys() == {"top_k", "moesart"}
    md = (tmp_path / "smoke.md").read_text()
    assert "| top_k |" in md and "| moesart |" in md and "p = " in md and "Command: `python benchmarks/" in md
