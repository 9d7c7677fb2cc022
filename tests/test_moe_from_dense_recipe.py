"""recipes/moe_from_dense.py end to end in its --quick form: a tiny Llama trained on local text, converted to a
routed FFN, distilled, exported and loaded back with plain transformers."""

from __future__ import annotations

import json

from .recipe_loader import load_recipe


def test_quick_run_exports_a_native_model_that_matches(tmp_path):
    results = load_recipe("moe_from_dense").main(["--quick", "--output_dir", str(tmp_path)])
    assert results["native_class"] == "MixtralForCausalLM"
    assert results["native_max_logit_difference"] < 1e-5  # the same float32 maths, summed in another order
    assert abs(results["native_eval_loss"] - results["distilled_eval_loss"]) < 1e-5
    assert results["generated"].startswith("The router")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert (tmp_path / "native" / "tokenizer.json").is_file()


def test_shared_neurons_trained_apart_stay_in_each_expert(tmp_path):
    """Each expert trains its own copy of MoEBERT's shared neurons; once distillation moved the copies apart, no
    shared expert holds them, and every expert keeps its full slice (exact as well)."""
    results = load_recipe("moe_from_dense").main(["--quick", "--shared_neurons", "16", "--output_dir", str(tmp_path)])
    assert results["native_class"] == "MixtralForCausalLM"
    assert results["native_max_logit_difference"] < 1e-5
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["intermediate_size"] == 16 + (128 - 16) // 4
