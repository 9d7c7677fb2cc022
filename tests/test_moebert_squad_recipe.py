"""recipes/moebert.py --task squad / squad_v2 end to end on a tiny random BERT span model and tiny SQuAD-shaped
data: one process in this process, two under `accelerate launch` (DDP on CPU), and the errors it gives first."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from .recipe_loader import RECIPES, load_recipe
from .squad_fixtures import save_tiny_squad
from .test_moebert_recipe import flags, read_results, save_tiny_bert

EVAL_ROWS = 6
WINDOWS = ["--max_seq_length", "24", "--doc_stride", "8"]
LOCAL = ["--use_evaluate", "false"]  # the Hub look-up of `evaluate` is slow; its fallback runs under accelerate below


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import BertForQuestionAnswering

    base = tmp_path_factory.mktemp("moebert_squad")
    data_dir = save_tiny_squad(str(base / "data"), train_rows=16, eval_rows=EVAL_ROWS)
    return data_dir, save_tiny_bert(str(base / "bert_qa"), 2, BertForQuestionAnswering)


def test_squad_v1_moesart_distils_and_scores_its_answers(assets, tmp_path):
    data_dir, bert = assets
    recipe = load_recipe("moebert")
    results = recipe.main(
        flags(data_dir, bert, tmp_path, "squad", "moesart", 12, *WINDOWS, *LOCAL, "--max_answer_length", "5")
    )
    for prefix in ("teacher", "converted", "eval"):
        assert 0 <= results[f"{prefix}_squad_exact_match"] <= results[f"{prefix}_squad_f1"] <= 100
    before, after = results["fidelity"]["converted"], results["fidelity"]["distilled"]
    assert after["relative_error"] < before["relative_error"], (before, after)
    assert (
        set(before["logits"]) == {"start_logits", "end_logits"} and before["logits"]["start_logits"]["rows"] > EVAL_ROWS
    )
    assert 0 <= before["answers_vs_teacher"]["exact"] <= before["answers_vs_teacher"]["f1"] <= 100
    assert results["routing"]["examples"] == before["logits"]["start_logits"]["rows"]  # windows, not questions
    assert results["routing_setup"]["task"] == "squad" and results["routing_setup"]["router"] == "moesart"

    # the saved adapter reloads and, through the library's pieces, scores what the run reported
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from hf_condroute.studies.squad import eval_features, extract_answers, local_squad_scores, model_inputs

    model = PeftModel.from_pretrained(AutoModelForQuestionAnswering.from_pretrained(bert), tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert)
    examples = load_from_disk(os.path.join(data_dir, "squad"))["validation"]
    features = eval_features(examples, tokenizer, max_length=24, stride=8)
    batch = tokenizer.pad(model_inputs(features).to_dict(), return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"].bool()
    start = np.where(mask, out.start_logits, -100.0)
    end = np.where(mask, out.end_logits, -100.0)
    answers = extract_answers(examples.to_list(), features.to_list(), start, end, max_answer_length=5)
    scores = local_squad_scores(answers, examples.to_list())
    assert scores["f1"] == pytest.approx(results["eval_squad_f1"]) and scores["exact_match"] == pytest.approx(
        results["eval_squad_exact_match"]
    )


def test_squad_v2_reports_answerable_and_unanswerable_parts(assets, tmp_path):
    data_dir, bert = assets
    recipe = load_recipe("moebert")
    results = recipe.main(
        flags(data_dir, bert, tmp_path, "squad_v2", "top_k", 2, *WINDOWS, *LOCAL, "--null_score_diff_threshold", "0.5")
    )
    assert results["eval_squad_v2_total"] == EVAL_ROWS
    assert results["eval_squad_v2_HasAns_total"] == 4 and results["eval_squad_v2_NoAns_total"] == 2
    for key in ("exact", "f1"):
        parts = 4 * results[f"eval_squad_v2_HasAns_{key}"] + 2 * results[f"eval_squad_v2_NoAns_{key}"]
        assert results[f"eval_squad_v2_{key}"] == pytest.approx(parts / EVAL_ROWS)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_seq_length", "24", "--doc_stride", "24"], "must be smaller than --max_seq_length"),
        (["--max_answer_length", "0"], "must be >= 1"),
        (["--max_seq_length", "12", "--doc_stride", "8"], "Raise --max_seq_length, lower --doc_stride"),
    ],
)
def test_bad_flags_fail_before_training(assets, tmp_path, extra, message):
    data_dir, bert = assets
    recipe = load_recipe("moebert")
    with pytest.raises(ValueError, match=message):
        recipe.main(flags(data_dir, bert, tmp_path, "squad", "top_k", 2, *LOCAL) + extra)
    assert not (tmp_path / "all_results.json").exists()


def test_default_window_is_squads():
    recipe = load_recipe("moebert")
    assert recipe.MoEBERTArguments(model_name_or_path="unused", task="squad").max_seq_length == 384
    assert recipe.MoEBERTArguments(model_name_or_path="unused", task="rte").max_seq_length == 128
    assert (
        recipe.ffn_config(recipe.MoEBERTArguments(model_name_or_path="unused", task="squad_v2"), None).task_type
        == "QUESTION_ANS"
    )


def test_two_processes_under_accelerate_launch(assets, tmp_path):
    data_dir, bert = assets
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(RECIPES / "moebert.py"), *flags(data_dir, bert, tmp_path, "squad_v2", "moesart", 3), *WINDOWS,
           "--use_cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # evaluate's metric is not cached here
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = read_results(tmp_path)
    assert results["routing_setup"]["processes"] == 2
    assert results["eval_squad_v2_total"] == EVAL_ROWS and "eval_squad_v2_f1" in results
