"""recipes/moebert.py end to end on a tiny random BERT and tiny GLUE-shaped data: one process in this process,
two under `accelerate launch` (DDP on CPU), and the errors it gives before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_condroute.studies.glue import get_task, task_metrics

from .glue_fixtures import fixture_texts, save_tiny_glue
from .recipe_loader import RECIPES, load_recipe

EVAL_ROWS = 6


def save_tiny_bert(model_dir: str, num_labels: int, model_class=None) -> str:
    """A randomly initialised 2-layer BERT classifier (or `model_class`, e.g. BertForQuestionAnswering) and a
    word-level tokenizer with BERT's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(
        fixture_texts(), trainer=trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    ).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
        initializer_range=0.2,
    )
    (model_class or BertForSequenceClassification)(config).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("moebert_recipe")
    data_dir = save_tiny_glue(str(base / "glue"), train_rows=16, eval_rows=EVAL_ROWS)
    return data_dir, save_tiny_bert(str(base / "bert2"), 2), save_tiny_bert(str(base / "bert1"), 1)


def flags(data_dir, model_dir, output_dir, task="rte", router="top_k", steps=12, *extra) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--data_dir", data_dir, "--task", task, "--router", router,
        "--output_dir", str(output_dir), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--learning_rate", "1e-2", "--distill_coef", "5", "--logging_steps", "4",
        "--save_strategy", "no", "--report_to", "none", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        "--seed", "3", *extra,
    ]  # fmt: skip


def read_results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as f:
        return json.load(f)


def test_one_process_moesart_distils_and_reports(assets, tmp_path):
    data_dir, bert2, _ = assets
    recipe = load_recipe("moebert")
    importance = tmp_path / "importance.safetensors"
    results = recipe.main(flags(data_dir, bert2, tmp_path, "rte", "moesart", 12, "--importance_file", str(importance)))
    assert importance.exists() and read_results(tmp_path) == json.loads(json.dumps(results))
    for prefix in ("teacher", "converted", "eval"):
        assert f"{prefix}_rte_accuracy" in results
        assert results[f"{prefix}_glue_score"] == pytest.approx(results[f"{prefix}_rte_accuracy"])
    before, after = results["fidelity"]["converted"], results["fidelity"]["distilled"]
    assert after["relative_error"] < before["relative_error"], (before, after)
    assert results["routing"]["examples"] == EVAL_ROWS and len(results["routing"]["blocks"]) == 2
    block = next(iter(results["routing"]["blocks"].values()))
    assert block["router"] == "moesart" and block["num_experts"] == 4 and block["top_k"] == 2
    assert results["routing_setup"] == {
        "task": "rte", "router": "moesart", "num_experts": 4, "top_k": 2, "expert_dim": 8, "shared_neurons": 0,
        "ffn_dim": 32, "routing_granularity": "token", "distill_coef": 5.0, "processes": 1,
    }  # fmt: skip
    # the saved adapter reloads and scores what the run reported
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert2), tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert2)
    from datasets import load_from_disk

    rows = load_from_disk(os.path.join(data_dir, "rte"))["validation"]
    batch = tokenizer(list(rows["sentence1"]), list(rows["sentence2"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    assert task_metrics(get_task("rte"), predictions, list(rows["label"]))["accuracy"] == pytest.approx(
        results["eval_rte_accuracy"]
    )


def test_regression_task_and_reused_importance(assets, tmp_path):
    data_dir, _, bert1 = assets
    recipe = load_recipe("moebert")
    importance = tmp_path / "importance.safetensors"
    recipe.main(flags(data_dir, bert1, tmp_path / "a", "stsb", "top_k", 2, "--importance_file", str(importance)))
    written = importance.stat().st_mtime_ns
    results = recipe.main(
        flags(
            data_dir,
            bert1,
            tmp_path / "b",
            "stsb",
            "hash",
            2,
            "--importance_file",
            str(importance),
            "--shared_neurons",
            "4",
        )
    )
    assert importance.stat().st_mtime_ns == written  # read, not computed again
    assert {"eval_stsb_pearson", "eval_stsb_spearmanr"} <= set(results)
    assert results["routing_setup"]["expert_dim"] == 4 + (32 - 4) // 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--router", "nope"], "Unknown router 'nope'"),
        (["--task", "wnli"], "WNLI is left out"),
        (["--expert_dim", "33"], "larger than the FFN"),
        (["--expert_dim", "4", "--shared_neurons", "5"], "larger than --expert_dim"),
        (["--router", "moesart", "--top_k", "1"], "top_k >= 2"),
    ],
)
def test_bad_flags_fail_before_training(assets, tmp_path, extra, message):
    data_dir, bert2, _ = assets
    recipe = load_recipe("moebert")
    with pytest.raises(ValueError, match=message):
        recipe.main(flags(data_dir, bert2, tmp_path, "rte", "top_k", 2) + extra)
    assert not (tmp_path / "all_results.json").exists()


def test_two_processes_under_accelerate_launch(assets, tmp_path):
    data_dir, bert2, _ = assets
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(RECIPES / "moebert.py"), *flags(data_dir, bert2, tmp_path, "rte", "top_k", 3), "--use_cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = read_results(tmp_path)
    assert results["routing_setup"]["processes"] == 2
    assert results["routing"]["examples"] == EVAL_ROWS and "eval_rte_accuracy" in results


def test_flags_keep_the_routed_ffn_defaults():
    # the recipe passes only what its flags choose: RoutedFFNConfig's MoEBERT defaults (norm_topk_prob) stay
    recipe = load_recipe("moebert")
    args = recipe.MoEBERTArguments(model_name_or_path="unused", task="rte", router="top_k", top_k=2)
    config = recipe.ffn_config(args, None)
    assert config.norm_topk_prob and config.router == "top_k" and config.top_k == 2
