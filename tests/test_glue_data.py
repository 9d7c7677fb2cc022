"""GLUE library code: task metadata, loading and checking local data, T5 casting, official metrics."""

from __future__ import annotations

import os
import shutil

import pytest
from datasets import load_from_disk

from hf_condroute.studies.glue import (
    GLUE_TASK_NAMES,
    GlueDataError,
    get_task,
    get_tasks,
    glue_average,
    load_glue,
    take,
    task_metrics,
)
from hf_condroute.studies.glue.text_to_text import parse_prediction, source_text, target_text

from .glue_fixtures import save_tiny_glue, tiny_glue


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return save_tiny_glue(str(tmp_path_factory.mktemp("glue")))


def _copy(data_dir, tmp_path):
    target = str(tmp_path / "glue")
    shutil.copytree(data_dir, target)
    return target


def test_tasks_are_the_eight_without_wnli():
    assert GLUE_TASK_NAMES == ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
    assert [t.tag for t in get_tasks(["rte", "cola"])] == [0, 7]
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").splits == ("train", "validation_matched", "validation_mismatched")
    with pytest.raises(ValueError, match="WNLI is left out"):
        get_task("wnli")
    with pytest.raises(ValueError, match="once"):
        get_tasks(["rte", "rte"])


def test_load_glue_from_disk(data_dir):
    data = load_glue(get_tasks(), data_dir)
    assert set(data) == set(GLUE_TASK_NAMES)
    assert data["qnli"]["validation"].column_names == ["question", "sentence", "label", "idx"]
    assert len(take(data["cola"]["train"], 3)) == 3 and len(take(data["cola"]["train"], None)) == 16


def test_every_problem_is_reported_at_once(data_dir, tmp_path):
    broken = _copy(data_dir, tmp_path)
    shutil.rmtree(os.path.join(broken, "rte"))
    mrpc = load_from_disk(os.path.join(data_dir, "mrpc"))
    del mrpc["validation"]
    mrpc.save_to_disk(os.path.join(broken, "mrpc_new"))
    shutil.rmtree(os.path.join(broken, "mrpc"))
    os.rename(os.path.join(broken, "mrpc_new"), os.path.join(broken, "mrpc"))
    qqp = load_from_disk(os.path.join(data_dir, "qqp"))
    qqp = qqp.rename_column("question2", "q2")
    shutil.rmtree(os.path.join(broken, "qqp"))
    qqp.save_to_disk(os.path.join(broken, "qqp"))
    with pytest.raises(GlueDataError) as err:
        load_glue(get_tasks(), broken)
    message = str(err.value)
    assert "rte: no folder" in message and "save_to_disk" in message
    assert "mrpc: no split 'validation'" in message
    assert "qqp/train: missing column(s) question2" in message
    # only the splits asked for are needed
    assert set(load_glue(get_tasks(["mrpc"]), broken, splits={"mrpc": ["train"]})) == {"mrpc"}


def test_data_dir_that_is_not_a_folder(tmp_path):
    with pytest.raises(GlueDataError, match="is not a folder"):
        load_glue(get_tasks(["cola"]), str(tmp_path / "nowhere"))


def test_t5_casting():
    mnli, stsb = get_task("mnli"), get_task("stsb")
    row = {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 1}
    assert source_text(mnli, row) == "mnli hypothesis: A person rests. premise: A man sleeps."
    assert source_text(get_task("cola"), {"sentence": "Hi."}) == "cola sentence: Hi."
    assert target_text(mnli, 1) == "neutral"
    # STS-B: nearest 0.2, one decimal (halves to even, as T5's tf.round)
    assert [target_text(stsb, x) for x in (3.9, 3.79, 2.5, 0.0, 5.0)] == ["4.0", "3.8", "2.4", "0.0", "5.0"]
    assert parse_prediction(stsb, " 3.8") == 3.8 and parse_prediction(stsb, "three") == -1.0
    assert parse_prediction(mnli, "contradiction") == 2 and parse_prediction(mnli, "maybe") == -1
    with pytest.raises(ValueError, match="class id"):
        target_text(mnli, -1)


def test_metrics_against_hand_computed_values():
    # CoLA: TP=2 TN=1 FP=1 FN=0 -> MCC = (2*1 - 1*0) / sqrt(3*2*2*1) = 2/sqrt(12)
    assert task_metrics("cola", [1, 0, 1, 1], [1, 0, 0, 1])["matthews_correlation"] == pytest.approx(2 / 12**0.5)
    # invalid answers are a class of their own for Matthews (as T5 scores them): all invalid -> 0, not -1
    assert task_metrics("cola", [-1, -1, -1], [1, 0, 1])["matthews_correlation"] == 0.0
    # MRPC: the invalid -1 counts as wrong (-> 1 for reference 0): TP=1 FP=2 FN=0 -> F1 = 2/4; accuracy 2/4
    assert task_metrics("mrpc", [1, -1, 1, 0], [1, 0, 0, 0]) == {"f1": 0.5, "accuracy": 0.5}
    # QQP F1 of the positive class: TP=1 FP=0 FN=1 -> 2/3
    assert task_metrics("qqp", [1, 0, 0], [1, 1, 0])["f1"] == pytest.approx(2 / 3)
    assert task_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    # STS-B: a linear map of the references has Pearson 1; ranks reversed in one pair -> Spearman 1 - 6*2/(4*15)
    stsb = task_metrics("stsb", [1.0, 2.0, 4.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert stsb["spearmanr"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert task_metrics("stsb", [2.0, 4.0, 6.0], [1.0, 2.0, 3.0])["pearson"] == pytest.approx(1.0)
    assert task_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    with pytest.raises(ValueError, match="unlabelled"):
        task_metrics("rte", [0, 1], [0, -1])


def test_glue_average_counts_mnli_once_and_averages_multi_metric_tasks():
    results = {
        "cola": {"matthews_correlation": 0.4},
        "mrpc": {"f1": 0.9, "accuracy": 0.7, "loss": 5.0},
        "mnli_matched": {"accuracy": 0.8},
        "mnli_mismatched": {"accuracy": 0.6},
    }
    assert glue_average(results) == pytest.approx((0.4 + 0.8 + 0.7) / 3)


def test_fixture_is_hub_shaped():
    data = tiny_glue()
    assert data["stsb"]["train"].features["label"].dtype == "float32"
    assert data["mnli"]["train"].features["label"].names == ["entailment", "neutral", "contradiction"]
