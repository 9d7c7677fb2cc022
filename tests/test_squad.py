"""hf_condroute.studies.squad: SQuAD's scores against hand-worked examples, answer extraction, the windowed
preprocessing, the data checks, and the distillation of start/end logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_condroute.studies.squad import (
    SQUAD_VERSIONS,
    SquadDataError,
    answer_agreement,
    check_squad_data,
    eval_features,
    extract_answers,
    load_squad,
    local_squad_scores,
    normalize_answer,
    squad_scores,
    token_f1,
    train_features,
)
from hf_condroute.studies.squad.metrics import _evaluate_metric

from .squad_fixtures import save_tiny_squad, tiny_squad
from .test_moebert_recipe import save_tiny_bert


def ref(qid, *texts):
    return {"id": qid, "answers": {"text": list(texts), "answer_start": [0] * len(texts)}}


def pred(qid, text):
    return {"id": qid, "prediction_text": text}


# ---- metrics -----------------------------------------------------------------------------------------------


def test_normalisation_is_squads():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("A-B") == "ab"  # punctuation removed, not split on


def test_v1_scores_hand_worked():
    refs = [ref("1", "the big cat", "a cat"), ref("2", "blue house"), ref("3", "Paris")]
    preds = [pred("1", "Cat"), pred("2", "small blue house"), pred("3", "London")]
    # 1: "cat" vs "a cat" -> "cat": EM 1, F1 1. 2: p=2/3, r=1 -> F1 0.8, EM 0. 3: 0, 0.
    scores = local_squad_scores(preds, refs)
    assert scores == pytest.approx({"exact_match": 100 / 3, "f1": 100 * 1.8 / 3})


def test_f1_counts_repeated_tokens_once_each():
    # pred "cat cat dog" vs gold "cat dog dog": common = {cat: 1, dog: 1} = 2, p = r = 2/3
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)


def test_v1_gold_that_normalises_to_nothing_scores_f1_zero_as_the_v1_script():
    scores = local_squad_scores([pred("1", "a")], [ref("1", "The")])
    assert scores == {"exact_match": 100.0, "f1": 0.0}


def test_v2_scores_hand_worked():
    refs = [ref("1", "red mat"), ref("2"), ref("3"), ref("4", "tree")]
    preds = [pred("1", "the red mat"), pred("2", ""), pred("3", "a dog"), pred("4", "")]
    # answerable: 1 -> EM 1 F1 1; 4 -> empty prediction: 0, 0. unanswerable: 2 -> 1, 1; 3 -> 0, 0
    scores = local_squad_scores(preds, refs, version_2=True)
    assert scores == {
        "exact": 50.0, "f1": 50.0, "total": 4,
        "HasAns_exact": 50.0, "HasAns_f1": 50.0, "HasAns_total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    }  # fmt: skip


def test_v2_partial_f1_and_missing_part():
    scores = local_squad_scores([pred("1", "green tree house")], [ref("1", "tree", "big tree")], version_2=True)
    # vs "tree": p 1/3 r 1 -> 0.5; vs "big tree": p 1/3 r 1/2 -> 0.4; best 0.5
    assert scores["f1"] == pytest.approx(50.0) and scores["exact"] == 0.0
    assert "NoAns_exact" not in scores


def test_v1_refuses_unanswerable_and_mismatched_ids():
    with pytest.raises(ValueError, match="squad_v2"):
        local_squad_scores([pred("1", "")], [ref("1")])
    with pytest.raises(ValueError, match="same question ids"):
        local_squad_scores([pred("2", "x")], [ref("1", "x")])


def test_squad_scores_falls_back_to_local_without_the_hub(monkeypatch, caplog):
    import evaluate

    def offline(name, *a, **k):
        raise FileNotFoundError(f"Couldn't find {name} on the Hub")

    monkeypatch.setattr(evaluate, "load", offline)
    _evaluate_metric.cache_clear()
    refs, preds = [ref("1", "blue house")], [pred("1", "small blue house")]
    with caplog.at_level("WARNING", logger="hf_condroute.studies.squad.metrics"):
        scores = squad_scores(preds, refs)
    assert scores == pytest.approx({"exact_match": 0.0, "f1": 80.0})
    assert "computing SQuAD's scores locally" in caplog.text


def test_squad_scores_uses_evaluate_where_it_loads(monkeypatch):
    import evaluate

    seen = {}

    class Metric:
        def compute(self, predictions, references):
            seen["predictions"] = predictions
            return {"exact": 1.0, "f1": 2.0, "total": 1, "best_exact": 3.0}

    monkeypatch.setattr(evaluate, "load", lambda name: seen.setdefault("name", name) and Metric())
    _evaluate_metric.cache_clear()
    scores = squad_scores([pred("1", "")], [ref("1")], version_2=True)
    assert seen["name"] == "squad_v2" and seen["predictions"][0]["no_answer_probability"] == 0.0
    assert scores == {"exact": 1.0, "f1": 2.0, "total": 1}  # only the keys computed locally too
    _evaluate_metric.cache_clear()


def test_answer_agreement_against_the_teacher():
    teacher = [pred("1", "red mat"), pred("2", ""), pred("3", "the"), pred("4", "the")]
    student = [pred("1", "mat"), pred("2", ""), pred("3", "a"), pred("4", "the cat")]
    # 1: p 1 r 1/2 -> F1 2/3, EM 0; 2 and 3: both normalise to nothing -> 1, 1; 4: "cat" against nothing -> 0, 0
    assert answer_agreement(student, teacher) == pytest.approx({"exact": 50.0, "f1": 100 * (2 / 3 + 2) / 4})


# ---- answer extraction ---------------------------------------------------------------------------------------


def _window(example_id, offsets):
    return {"example_id": example_id, "offset_mapping": offsets}


CONTEXT = "aa bb cc dd"
# tokens: [CLS] question [SEP] aa bb cc dd [SEP]
OFFSETS = [None, None, None, [0, 2], [3, 5], [6, 8], [9, 11], None]


def test_extract_best_span_within_the_maximum_length():
    start = np.array([[0, 9, 0, 1, 5, 0, 0, 0]], dtype=float)
    end = np.array([[0, 0, 9, 0, 0, 1, 4, 0]], dtype=float)
    examples, features = [{"id": "q", "context": CONTEXT}], [_window("q", OFFSETS)]
    # question tokens (9s) are outside the context; best allowed: start bb (5) + end dd (4) = 9
    assert extract_answers(examples, features, start, end)[0]["prediction_text"] == "bb cc dd"
    # at most 2 tokens: bb..cc (5 + 1 = 6) beats aa..cc (1 + 1) and cc..dd (0 + 4 = 4)
    short = extract_answers(examples, features, start, end, max_answer_length=2)
    assert short[0]["prediction_text"] == "bb cc"
    # n_best 1: only start bb, only end question -> no allowed span, v1 answers ""
    assert extract_answers(examples, features, start, end, n_best=1)[0]["prediction_text"] == ""


def test_extract_across_windows_and_padding():
    # two windows of one question; the second window's logits are padded past its length with -100
    start = np.array([[0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 3, 0, -100, -100, -100, -100]], dtype=float)
    end = np.array([[0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 3, -100, -100, -100, -100]], dtype=float)
    features = [_window("q", OFFSETS), _window("q", [None, None, [6, 8], [9, 11]])]
    answers = extract_answers([{"id": "q", "context": CONTEXT}], features, start, end)
    assert answers == [{"id": "q", "prediction_text": "cc dd"}]  # 3 + 3 in window 2 beats 2 + 2 in window 1


def test_v2_null_threshold():
    start = np.array([[4.0, 0, 0, 3, 0, 0, 0, 0]])
    end = np.array([[4.0, 0, 0, 2, 0, 0, 0, 0]])
    examples, features = [{"id": "q", "context": CONTEXT}], [_window("q", OFFSETS)]
    # null score 8 against the best span aa (5): no answer unless the threshold is at least 3
    assert extract_answers(examples, features, start, end, version_2=True)[0]["prediction_text"] == ""
    assert (
        extract_answers(examples, features, start, end, version_2=True, null_threshold=3.0)[0]["prediction_text"]
        == "aa"
    )
    assert extract_answers(examples, features, start, end, version_2=False)[0]["prediction_text"] == "aa"


def test_extract_refuses_logits_of_other_features():
    with pytest.raises(ValueError, match="one row per window"):
        extract_answers([{"id": "q", "context": CONTEXT}], [_window("q", OFFSETS)], np.zeros((2, 8)), np.zeros((2, 8)))


# ---- preprocessing -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_bert(str(tmp_path_factory.mktemp("tok")), 2))


def test_training_windows_label_the_answer_or_cls(tokenizer):
    data = tiny_squad(version_2=True, train_rows=12)["train"]
    features = train_features(data, tokenizer, max_length=20, stride=6)
    assert len(features) > len(data)  # long contexts make several windows
    encoded = tokenizer(
        list(data["question"]), list(data["context"]), truncation="only_second", max_length=20, stride=6,
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )  # fmt: skip
    inside = 0
    for i, row in enumerate(features):
        example = data[encoded["overflow_to_sample_mapping"][i]]
        s, e = row["start_positions"], row["end_positions"]
        if s == 0:
            assert e == 0
            continue
        inside += 1
        offsets = encoded["offset_mapping"][i]
        assert example["context"][offsets[s][0] : offsets[e][1]] == example["answers"]["text"][0]
    unanswerable = {i for i, a in enumerate(data["answers"]) if not a["text"]}
    assert unanswerable and all(
        features[i]["start_positions"] == 0
        for i, n in enumerate(encoded["overflow_to_sample_mapping"])
        if n in unanswerable
    )
    assert inside >= len(data) - len(unanswerable)  # every answer is whole in at least one window


def test_eval_windows_keep_ids_and_context_offsets(tokenizer):
    data = tiny_squad(eval_rows=4)["validation"]
    features = eval_features(data, tokenizer, max_length=20, stride=6)
    assert set(features["example_id"]) == set(data["id"])
    row = features[0]
    question_tokens = len(tokenizer(data[0]["question"], add_special_tokens=False)["input_ids"])
    assert row["offset_mapping"][: question_tokens + 2] == [None] * (question_tokens + 2)  # [CLS] question [SEP]
    assert row["offset_mapping"][-1] is None and row["offset_mapping"][question_tokens + 2] == [0, 3]
    # neighbouring windows of one context share `stride` context tokens
    first, second = [f["offset_mapping"] for f in features if f["example_id"] == data[0]["id"]][:2]
    shared = [o for o in first if o is not None][-6:]
    assert [o for o in second if o is not None][:6] == shared


def test_too_long_question_is_a_clear_error(tokenizer):
    data = tiny_squad(eval_rows=2)["validation"]
    data = data.map(lambda r: {"question": " ".join(["cat"] * 12)})
    with pytest.raises(ValueError, match="Raise --max_seq_length, lower --doc_stride"):
        eval_features(data, tokenizer, max_length=20, stride=6)


# ---- data ----------------------------------------------------------------------------------------------------


def test_local_data_folder_or_task_subfolder(tmp_path):
    save_tiny_squad(str(tmp_path))
    assert len(load_squad("squad_v2", str(tmp_path))["validation"]) == 6
    assert len(load_squad("squad", str(tmp_path / "squad"))["train"]) == 16


def test_bad_data_reports_every_problem(tmp_path):
    data = tiny_squad()
    data["validation"] = data["validation"].remove_columns(["answers"])
    del data["train"]
    with pytest.raises(SquadDataError) as err:
        check_squad_data(SQUAD_VERSIONS["squad"], data, "here")
    assert "no split 'train'" in str(err.value) and "missing column(s) answers" in str(err.value)
    with pytest.raises(SquadDataError, match="Neither .* is a `save_to_disk` DatasetDict"):
        load_squad("squad", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown SQuAD task"):
        load_squad("squad_v3", str(tmp_path))


# ---- distillation of start/end logits -----------------------------------------------------------------------


def test_span_logit_loss_is_the_kl_over_non_padding_tokens():
    from hf_condroute.moebert import span_logit_loss

    student = torch.tensor([[0.0, 1.0, 5.0]])
    teacher = torch.tensor([[1.0, 0.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    # over the two real tokens: teacher p = softmax(1, 0), student q = softmax(0, 1) -> KL = (2p - 1) * 1, p = e/(1+e)
    p = math.e / (1 + math.e)
    assert span_logit_loss(student, teacher, mask).item() == pytest.approx(p * 1 + (1 - p) * -1, abs=1e-6)
    assert span_logit_loss(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_trainer_keeps_the_qa_task_loss(tmp_path):
    from peft import get_peft_model
    from transformers import BertConfig, BertForQuestionAnswering, TrainingArguments

    from hf_condroute import RoutedFFNConfig
    from hf_condroute.moebert import DistillationTrainer, distillation_loss, teacher_outputs

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = get_peft_model(
        BertForQuestionAnswering(config),
        RoutedFFNConfig(task_type="QUESTION_ANS", num_experts=4, top_k=2, init_weights=False),
    )
    batch = {
        "input_ids": torch.randint(1, 30, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([2, 3]),
    }  # fmt: skip
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=model, args=args, distill_coef=2.0)
    assert set(trainer.label_names) == {"start_positions", "end_positions"}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    teacher = teacher_outputs(model, batch)
    student = model(**batch, output_hidden_states=True)  # no dropout: the same forward as in compute_loss
    expected = student.loss + 2.0 * distillation_loss(student, teacher, attention_mask=batch["attention_mask"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(student, teacher, attention_mask=batch["attention_mask"]) > 0


def test_logit_gap_is_the_kl_and_agreement_over_real_tokens():
    from peft import get_peft_model
    from transformers import BertConfig, BertForQuestionAnswering

    from hf_condroute import RoutedFFNConfig
    from hf_condroute.moebert import logit_gap, teacher_outputs

    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        initializer_range=0.5,  # logits large enough for a KL well above rounding
    )  # fmt: skip
    model = get_peft_model(
        BertForQuestionAnswering(config),
        RoutedFFNConfig(task_type="QUESTION_ANS", num_experts=4, top_k=1, init_weights=False),
    ).eval()
    batch = {
        "input_ids": torch.randint(1, 30, (3, 7)),
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]),
    }
    gap = logit_gap(model, [batch])
    dense, routed = teacher_outputs(model, batch), model(**batch)
    for key in ("start_logits", "end_logits"):
        kls, agree = [], 0
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            p = torch.softmax(getattr(dense, key)[i, :n], -1)
            q = torch.softmax(getattr(routed, key)[i, :n], -1)
            kls.append(float((p * (p.log() - q.log())).sum()))
            agree += int(p.argmax() == q.argmax())
        assert gap[key]["kl"] == pytest.approx(sum(kls) / 3, rel=1e-4) and gap[key]["kl"] > 0
        assert gap[key]["top1_agreement"] == pytest.approx(agree / 3) and gap[key]["rows"] == 3
