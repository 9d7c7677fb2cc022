"""Evaluating a text-to-text model on GLUE inside `Seq2SeqTrainer.evaluate`.

`GlueSeq2SeqTrainer.evaluate()` generates an answer for every example of every evaluation set (on all processes,
gathered as the Trainer gathers predictions), maps the text back to labels, scores each set with its official
metric and adds the GLUE average, so `--eval_strategy steps`, `load_best_model_at_end` with
`--metric_for_best_model glue_average` and the Trainer's logging all see GLUE scores. After generating, each
evaluation step runs a teacher-forced forward for the loss, whose routing decisions `RoutingStatsCallback`
collects (one log after all sets: its statistics cover every set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from transformers import Seq2SeqTrainer

from .metrics import glue_average, task_metrics
from .tasks import GlueTask
from .text_to_text import parse_prediction, target_vocabulary


@dataclass
class GlueEvalSet:
    """One evaluation set: its task, the tokenized rows (`tokenize_for_t5`) and the true labels."""

    task: GlueTask
    dataset: Dataset
    references: list


def max_target_tokens(tokenizer, tasks: list[GlueTask]) -> int:
    """Tokens the longest target text of any task needs, end-of-sequence included."""
    texts = [text for task in tasks for text in target_vocabulary(task)]
    return max(len(ids) for ids in tokenizer(text_target=texts)["input_ids"])


class GlueSeq2SeqTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose `evaluate()` reports every GLUE set's official metrics and the GLUE average.

    Args (besides Seq2SeqTrainer's):
        glue_eval_sets: {evaluation set name (`cola`, `mnli_matched`, ...): GlueEvalSet}.
    """

    def __init__(self, *args, glue_eval_sets: dict[str, GlueEvalSet], **kwargs):
        if kwargs.get("eval_dataset") is None:
            # the Trainer checks there is something to evaluate when `eval_strategy` is set
            kwargs["eval_dataset"] = {name: s.dataset for name, s in glue_eval_sets.items()}
        super().__init__(*args, **kwargs)
        self.glue_eval_sets = glue_eval_sets

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        gen = dict(gen_kwargs)
        if gen.get("max_length") is None and gen.get("max_new_tokens") is None:
            if self.args.generation_max_length is not None:
                gen["max_length"] = self.args.generation_max_length
            else:
                tasks = [s.task for s in self.glue_eval_sets.values()]
                # + 1: the decoder start token counts in max_length
                gen["max_length"] = max_target_tokens(self.processing_class, tasks) + 1
        if gen.get("num_beams") is None:
            gen["num_beams"] = self.args.generation_num_beams or 1
        return gen

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        if eval_dataset is not None:
            raise ValueError(
                "GlueSeq2SeqTrainer evaluates its `glue_eval_sets`; build a new trainer to evaluate other data."
            )
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        self._memory_tracker.start()
        start = time.time()
        metrics: dict[str, float] = {}
        results: dict[str, dict[str, float]] = {}
        for name, eval_set in self.glue_eval_sets.items():
            prefix = f"{metric_key_prefix}_{name}"
            output = self.evaluation_loop(
                self.get_eval_dataloader(eval_set.dataset),
                description=f"Evaluation of {name}",
                prediction_loss_only=False,
                ignore_keys=ignore_keys,
                metric_key_prefix=prefix,
            )
            predictions = self.decode(output.predictions)
            labels = [parse_prediction(eval_set.task, text) for text in predictions]
            results[name] = task_metrics(eval_set.task, labels, eval_set.references)
            metrics.update({f"{prefix}_{k}": v for k, v in results[name].items()})
            if f"{prefix}_loss" in output.metrics:
                metrics[f"{prefix}_loss"] = output.metrics[f"{prefix}_loss"]
            metrics[f"{prefix}_samples"] = output.num_samples
        metrics[f"{metric_key_prefix}_glue_average"] = glue_average(results)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def decode(self, token_ids: np.ndarray) -> list[str]:
        pad = self.processing_class.pad_token_id
        token_ids = np.where(token_ids != -100, token_ids, pad)  # -100: padding added when gathering
        return self.processing_class.batch_decode(token_ids, skip_special_tokens=True)
