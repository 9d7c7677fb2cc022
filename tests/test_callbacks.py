import types
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_condroute import RoutingStatsCallback, get_routing_stats, last_step

from .analytics_helpers import collate, tagged_seq2seq, tiny_bert_model, tiny_t5_model


class Reporter(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, wandb, ...): it records the logs it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(model, tmp_path, callback, steps=4, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        **kwargs,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tagged_seq2seq(32),
        eval_dataset=tagged_seq2seq(8, seed=1),
        data_collator=collate,
    )
    reporter = Reporter()
    # where Trainer puts integrations: right after DefaultFlowCallback
    trainer.callback_handler.callbacks.insert(1, reporter)
    callback.attach(trainer)
    return trainer, reporter


def test_tag_routing_metrics_reach_reporters_and_history(tmp_path):
    model = tiny_t5_model(router="tag", num_experts=2)
    callback = RoutingStatsCallback(tags_per_group=2, per_block=True)
    trainer, reporter = make_trainer(
        model, tmp_path, callback, gradient_accumulation_steps=2, train_sampling_strategy="sequential"
    )
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("RoutingStatsCallback") < names.index("Reporter")
    trainer.train()
    trainer.evaluate()
    trainer.evaluate()  # the same examples again: nothing flips

    train_logs = [log for log in reporter.logs if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        # in order, tags alternate 0, 1 and tag routing sends tag t to expert t: every block is balanced
        assert log["routing_load_entropy"] == pytest.approx(1.0)
        assert log["routing_max_share"] == pytest.approx(0.5)
        assert log["routing_experts_used"] == pytest.approx(1.0)
        assert log["routing_router_entropy"] == pytest.approx(0.0)
        assert log["routing_collapsed_blocks"] == 0
        per_block = [k for k in log if k.startswith("routing_max_share/")]
        assert len(per_block) == 4
    eval_log = reporter.logs[-1]
    assert eval_log["eval_routing_focus"] == pytest.approx(1.0)
    assert eval_log["eval_routing_cover"] == pytest.approx(1.0)
    assert eval_log["eval_routing_flip_rate"] == pytest.approx(0.0)
    assert "eval_routing_flip_rate" not in reporter.logs[-2]  # nothing to compare the first evaluation with
    assert trainer.state.log_history[-1]["eval_routing_cover"] == pytest.approx(1.0)
    assert any("routing_load_entropy" in h for h in trainer.state.log_history)

    stats = get_routing_stats(model)
    # each logging window is 2 optimizer steps x 2 micro-batches x 4 examples: every micro-batch counted
    assert stats["train"].examples == 16 and stats["train"].global_step == 4
    assert stats["eval"].examples == 8 and stats["eval"].focus == pytest.approx(1.0)


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values.append(float(last_step(model).loss_values["load_balance"]))


def test_aux_losses_are_logged_as_the_mean_over_steps(tmp_path):
    model = tiny_t5_model(router="top_k", num_experts=2, router_aux_loss_coef=0.01)
    trainer, reporter = make_trainer(model, tmp_path, RoutingStatsCallback())
    recorder = LossRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    logs = [log for log in reporter.logs if "loss" in log]
    assert logs[0]["routing_loss_load_balance"] == pytest.approx(sum(recorder.values[:2]) / 2, abs=1e-6)
    assert logs[1]["routing_loss_load_balance"] == pytest.approx(sum(recorder.values[2:4]) / 2, abs=1e-6)


def test_collapse_warns_once_per_block(tmp_path):
    model = tiny_t5_model(router="top_k", num_experts=3)
    for module in model.modules():
        if hasattr(module, "proj") and module.proj.out_features == 3:  # router networks: always expert 2
            with torch.no_grad():
                module.proj.weight.zero_()
                module.proj.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    callback = RoutingStatsCallback(collapse_threshold=0.95)
    trainer, reporter = make_trainer(model, tmp_path, callback, steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    collapse = [w for w in caught if "Routing collapse" in str(w.message)]
    assert len(collapse) == 1  # two logging steps, one warning
    message = str(collapse[0].message)
    assert "4 block(s)" in message and "100%" in message and "router_aux_loss_coef" in message
    assert reporter.logs[0]["routing_collapsed_blocks"] == 4
    assert reporter.logs[0]["routing_max_share"] == pytest.approx(1.0)


def test_heuristic_routing_never_counts_as_collapse(tmp_path):
    model = tiny_t5_model(router="monolithic")
    trainer, reporter = make_trainer(model, tmp_path, RoutingStatsCallback())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "Routing collapse" in str(w.message)]
    assert reporter.logs[0]["routing_collapsed_blocks"] == 0


def test_predict_does_not_leak_into_the_next_evaluation(tmp_path):
    model = tiny_t5_model(router="tag")
    trainer, reporter = make_trainer(model, tmp_path, RoutingStatsCallback(flip_rate=False))
    trainer.predict(tagged_seq2seq(12, seed=3))
    trainer.evaluate()
    assert get_routing_stats(model)["eval"].examples == 8
    assert "eval_routing_flip_rate" not in reporter.logs[-1]


def test_other_logs_are_left_alone(tmp_path):
    model = tiny_t5_model(router="tag")
    trainer, reporter = make_trainer(model, tmp_path, RoutingStatsCallback(), steps=1)
    trainer.train()
    trainer.log({"my_metric": 1.0})
    assert reporter.logs[-1] == {"my_metric": 1.0, "epoch": trainer.state.epoch}


def test_per_token_training_counts_tokens_not_padding():
    model = tiny_bert_model(router="top_k", num_experts=3, top_k=2, routing_granularity="token")
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0], [8, 9, 10, 0]])
    model(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 1, 2])).loss.backward()
    callback = RoutingStatsCallback()
    args = types.SimpleNamespace(report_to=[])
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    callback.on_step_end(args, TrainerState(), TrainerControl(), model=model)
    callback.on_step_end(args, TrainerState(), TrainerControl(), model=model)  # the same forward: not counted again
    stats = callback._train.compute("train")
    assert stats.examples == 3
    for block in stats.blocks.values():
        assert block.rows == 9 and sum(block.counts) == 18


def test_evaluation_forward_that_routes_nothing_is_skipped():
    model = tiny_bert_model(router="tag", num_experts=3)
    ids = torch.tensor([[2, 3, 4], [6, 7, 8]])
    callback = RoutingStatsCallback()
    args = types.SimpleNamespace(report_to=[])
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    model.eval()
    with torch.no_grad(), model.disable_adapter():  # e.g. evaluating the dense teacher of a distillation
        model(input_ids=ids, routing_tags=torch.tensor([0, 1]))
    callback.on_prediction_step(args, TrainerState(), TrainerControl(), model=model)
    assert callback._eval.compute("eval").examples == 0


def test_warns_when_added_after_reporting_integrations():
    model = tiny_t5_model()
    callback = RoutingStatsCallback()
    args = types.SimpleNamespace(report_to=["wandb"])
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="collapse_threshold"):
        RoutingStatsCallback(collapse_threshold=1.5)
    with pytest.raises(ValueError, match="routed layers"):
        RoutingStatsCallback().on_train_begin(
            types.SimpleNamespace(report_to=[]), TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2)
        )
