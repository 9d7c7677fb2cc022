"""MoEBERT on a GLUE task or SQuAD v1.1 / v2.0 (paper B section 4.2, Table 2 and S7): a BERT fine-tuned on the
task is turned into a mixture of experts and distilled from itself, on one or many processes.

    accelerate launch recipes/moebert.py --model_name_or_path textattack/bert-base-uncased-RTE --task rte \\
        --router moesart --trimmed_lasso_coef 0.01 --expert_dim 768 --shared_neurons 512 --output_dir runs/rte_moesart
    python recipes/moebert.py --model_name_or_path my_bert_rte --data_dir my_glue --task rte --router top_k ...
    accelerate launch recipes/moebert.py --model_name_or_path my_bert_squad --task squad --router moesart \\
        --max_seq_length 384 --doc_stride 128 --num_train_epochs 4 --output_dir runs/squad_moesart

The three steps of MoEBERT's code (Zuo et al. 2022), as paper B ran them:
1. the importance of every feed-forward neuron on the task's training data (`hf_condroute.moebert.importance_scores`);
2. each feed-forward network replaced by `--num_experts` experts of `--expert_dim` neurons, the `--shared_neurons`
   most important in all of them (`RoutedFFNConfig`, a PEFT method: the dense weights stay, frozen);
3. distillation with the Trainer: task loss + `--distill_coef` x (MSE of every layer's hidden states + KL of the
   logits, MSE for STS-B) against the same model with its adapters disabled, i.e. the dense teacher.
Only the experts, routers and classifier (QA: span head) train (the rest is the teacher's). Evaluation uses
the task's official metric: GLUE's, or SQuAD's exact match / F1 (`hf_condroute.studies.squad`: windows with a stride
over long contexts, n-best answer extraction with a maximum answer length and, for v2.0, the no-answer
threshold); `all_results.json` has the teacher's, the converted model's (before distillation) and the distilled
model's metrics, how far their hidden states and logits are from the teacher's (for SQuAD also their answers),
and routing statistics. For SQuAD the KL term covers the start and the end logits.

Every `TrainingArguments` flag works as usual (`--eval_strategy epoch --load_best_model_at_end
--metric_for_best_model <metric>` picks the best epoch, as paper B did). `--data_dir` is a folder of
`save_to_disk` GLUE tasks named by the Hub's config names; without it `nyu-mll/glue` is loaded from the Hub. For
SQuAD it is a `save_to_disk` copy of `rajpurkar/squad` / `rajpurkar/squad_v2` (or a folder holding one named
`squad` / `squad_v2`); without it the Hub's is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_condroute import RoutedFFNConfig, RoutingConfig, RoutingStatsCallback
from hf_condroute.integrations.distributed import (
    SyncRouterStatisticsCallback,
    all_reduce_,
    check_process_count,
    end_distributed,
)
from hf_condroute.moebert import DistillationTrainer, hidden_state_gap, importance_scores, logit_gap, plan_conversion
from hf_condroute.stats import compute_routing_stats
from hf_condroute.studies.cli import TRAINING_LOWS, check_at_least, from_the_hub, run_recipe, usage_errors
from hf_condroute.studies.glue import get_task
from hf_condroute.studies.moebert_tasks import TaskRun, glue_run, squad_run
from hf_condroute.studies.squad import (
    SQUAD_VERSIONS,
    answer_agreement,
    get_squad_version,
)

logger = logging.getLogger(__name__)


@dataclass
class MoEBERTArguments:
    model_name_or_path: str = field(
        metadata={"help": "A BERT-like classifier fine-tuned on the task (Hub name or folder): the teacher."}
    )
    task: str = field(
        default="rte",
        metadata={"help": "GLUE task (Hub config name: cola sst2 mrpc qqp stsb mnli qnli rte), or squad / squad_v2."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with one `save_to_disk` DatasetDict per task (SQuAD: or the DatasetDict itself); "
            "default: the Hub."
        },
    )
    router: str = field(
        default="top_k", metadata={"help": "A router of hf_condroute.ROUTERS (paper B: top_k, moesart)."}
    )
    num_experts: int = field(default=4, metadata={"help": "Experts per FFN (MoEBERT: 4)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (paper B: 2)."})
    expert_dim: int | None = field(
        default=None, metadata={"help": "Neurons per expert (MoEBERT on BERT-base: 768); default: FFN size / experts."}
    )
    shared_neurons: int = field(
        default=0, metadata={"help": "Most important neurons shared by all experts (MoEBERT: 512)."}
    )
    routing_granularity: str = field(default="token", metadata={"help": "token (MoEBERT) or example."})
    trimmed_lasso_coef: float = field(
        default=0.0, metadata={"help": "MOESART's trimmed lasso weight (paper B grid 1e-4..10)."}
    )
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "Load-balancing loss weight."})
    distill_coef: float = field(default=1.0, metadata={"help": "Weight of the distillation term (paper B grid: 1..5)."})
    importance_batches: int | None = field(
        default=None, metadata={"help": "Batches of training data for the importance scores (default: all)."}
    )
    importance_file: str | None = field(
        default=None,
        metadata={
            "help": "A safetensors file of importance scores: read when it exists, else computed and written there."
        },
    )
    fidelity_batches: int = field(default=8, metadata={"help": "Evaluation batches for the hidden-state comparison."})
    max_train_samples: int | None = field(default=None, metadata={"help": "First N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "First N rows of each evaluation set."})
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Inputs are truncated (SQuAD: windowed) to this many tokens; default 128, SQuAD 384."},
    )
    doc_stride: int = field(
        default=128, metadata={"help": "SQuAD: tokens shared by neighbouring windows of a long context."}
    )
    n_best_size: int = field(default=20, metadata={"help": "SQuAD: start and end candidates per window."})
    max_answer_length: int = field(default=30, metadata={"help": "SQuAD: longest answer, in tokens."})
    null_score_diff_threshold: float = field(
        default=0.0,
        metadata={"help": "SQuAD v2.0: no answer when the null score beats the best span by more than this."},
    )
    use_evaluate: bool = field(
        default=True,
        metadata={
            "help": "SQuAD: score with `evaluate`'s squad metric where it loads (else the same formulas locally)."
        },
    )

    def __post_init__(self):
        if self.max_seq_length is None:
            self.max_seq_length = 384 if self.task in SQUAD_VERSIONS else 128


@dataclass
class MoEBERTTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for distilling into routed experts (paper B S7: 10 epochs)."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs (paper B: 10)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Expert banks stack their experts, so every trainable parameter gets a gradient."},
    )


def routing_fields(args: MoEBERTArguments) -> dict:
    """The routing settings the flags choose; every other field keeps its config's default (RoutedFFNConfig's
    MoEBERT defaults, e.g. norm_topk_prob=True, where the routed FFN is built)."""
    return dict(
        router=args.router,
        num_experts=args.num_experts,
        top_k=args.top_k,
        routing_granularity=args.routing_granularity,
        trimmed_lasso_coef=args.trimmed_lasso_coef,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )


RECIPE_LOWS = {
    "num_experts": 1,
    "top_k": 1,
    "expert_dim": 1,
    "shared_neurons": 0,
    "trimmed_lasso_coef": 0,
    "router_aux_loss_coef": 0,
    "distill_coef": 0,
    "importance_batches": 1,
    "fidelity_batches": 1,
    "max_train_samples": 1,
    "max_eval_samples": 1,
    "max_seq_length": 1,
    "doc_stride": 0,
}
MODEL_OPTION = "--model_name_or_path (a local save_pretrained folder of the fine-tuned model)"


def check_arguments(args: MoEBERTArguments) -> None:
    """Every mistake in the flags, found before any data or model is loaded."""
    if args.task in SQUAD_VERSIONS:
        get_squad_version(args.task)
        if args.doc_stride >= args.max_seq_length:
            raise ValueError(
                f"--doc_stride {args.doc_stride} must be smaller than --max_seq_length {args.max_seq_length}: it is "
                "how many tokens neighbouring windows of a long context share."
            )
        if args.n_best_size < 1 or args.max_answer_length < 1:
            raise ValueError(
                f"--n_best_size ({args.n_best_size}) and --max_answer_length ({args.max_answer_length}) must be >= 1."
            )
    else:
        get_task(args.task)
    RoutingConfig(**routing_fields(args)).validate_routing()
    if args.expert_dim is not None and args.shared_neurons > args.expert_dim:
        raise ValueError(
            f"--shared_neurons {args.shared_neurons} is larger than --expert_dim {args.expert_dim}: the shared neurons "
            "are part of every expert."
        )
    if args.distill_coef < 0:
        raise ValueError(f"--distill_coef must be >= 0, got {args.distill_coef}.")


def parse_arguments(argv: list[str] | None = None) -> tuple[MoEBERTArguments, MoEBERTTrainingArguments]:
    parser = HfArgumentParser((MoEBERTArguments, MoEBERTTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        args, training_args = parser.parse_json_file(argv[0])
    else:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_process_count(training_args)
    check_at_least(training_args, TRAINING_LOWS)
    check_at_least(args, RECIPE_LOWS)
    check_arguments(args)
    return args, training_args


def ffn_config(args: MoEBERTArguments, importance) -> RoutedFFNConfig:
    return RoutedFFNConfig(
        **routing_fields(args),
        task_type="QUESTION_ANS" if args.task in SQUAD_VERSIONS else "SEQ_CLS",
        expert_dim=args.expert_dim,
        shared_neurons=args.shared_neurons,
        importance=importance,
        init_weights=importance is not None,
    )


def neuron_importance(args, training_args, model, train_dataset, collator) -> dict:
    """Importance on the training data; each process scores its share and the sums are added up, so every process
    converts the model the same way."""
    if args.importance_file is not None and os.path.exists(args.importance_file):
        logger.info("Reading importance scores from %s", args.importance_file)
        return load_file(args.importance_file)
    shard = train_dataset.shard(training_args.world_size, training_args.process_index, contiguous=True)
    loader = DataLoader(shard, batch_size=training_args.per_device_train_batch_size, collate_fn=collator)
    max_batches = None
    if args.importance_batches is not None:
        max_batches = -(-args.importance_batches // training_args.world_size)
    scores = importance_scores(model.to(training_args.device), loader, max_batches=max_batches, progress=True)
    all_reduce_(list(scores.values()), device=training_args.device)
    if args.importance_file is not None and training_args.process_index == 0:
        save_file({k: v.contiguous() for k, v in scores.items()}, args.importance_file)
    return scores


def output_fidelity(model, loader, batches: int, run: TaskRun, prefix: str) -> dict:
    """Hidden states and logits against the teacher's; for SQuAD also the answers (EM / F1 against the teacher's)."""
    gap = hidden_state_gap(model, loader, batches)
    gap["logits"] = logit_gap(model, loader, batches)
    if prefix in run.answers and "teacher" in run.answers:
        gap["answers_vs_teacher"] = answer_agreement(run.answers[prefix], run.answers["teacher"])
    return gap


def train_and_evaluate(args: MoEBERTArguments, training_args: MoEBERTTrainingArguments):
    """Load (and check) the data, convert, distil, evaluate; returns (trainer, results)."""
    set_seed(training_args.seed)
    with usage_errors(), from_the_hub("the tokenizer", args.model_name_or_path, MODEL_OPTION):
        AutoConfig.from_pretrained(args.model_name_or_path)  # a small file: a Hub id that cannot load stops here
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    run = (squad_run if args.task in SQUAD_VERSIONS else glue_run)(args, training_args, tokenizer)
    with usage_errors(), from_the_hub("the model", args.model_name_or_path, MODEL_OPTION):
        model = run.model_class(args.model_name_or_path)
    plan = plan_conversion(model, ffn_config(args, None))  # unknown architecture or bad sizes: fail before any work
    train_dataset, eval_sets = run.train_dataset, run.eval_sets
    collator = DataCollatorWithPadding(tokenizer)

    scores = neuron_importance(args, training_args, model, train_dataset, collator)
    peft_config = ffn_config(args, scores)
    set_seed(training_args.seed)  # every process builds the same routers
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=run.compute_metrics,
        callbacks=[SyncRouterStatisticsCallback()],
        distill_coef=args.distill_coef,
        regression=run.regression,
    )
    first_set, fidelity_data = next(iter(eval_sets.items()))
    fidelity_loader = DataLoader(
        fidelity_data, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator
    )

    results: dict = {}
    with model.disable_adapter():
        teacher, summary = run.score(trainer, "teacher")
        results.update(summary)
    RoutingStatsCallback().attach(trainer)  # after the teacher's evaluation, which routes nothing
    converted, summary = run.score(trainer, "converted")
    results.update(summary)
    fidelity = {"converted": output_fidelity(model, fidelity_loader, args.fidelity_batches, run, "converted")}

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    final, summary = run.score(trainer, "eval")
    results.update(summary)
    fidelity["distilled"] = output_fidelity(model, fidelity_loader, args.fidelity_batches, run, "eval")

    # routing statistics over the first evaluation set, each process its exact share (the Trainer's evaluation
    # pads the last batch across processes with repeated examples)
    shard = fidelity_data.shard(training_args.world_size, training_args.process_index, contiguous=True)
    shard_loader = DataLoader(shard, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator)
    stats = compute_routing_stats(model, (dict(b) for b in shard_loader), split=f"eval_{first_set}")
    results.update({**train_result.metrics, **teacher, **converted, **final, "train_samples": len(train_dataset)})
    results["fidelity"] = fidelity
    results["routing"] = stats.to_dict()
    some = next(iter(plan.values()))
    results["routing_setup"] = {
        "task": args.task,
        "router": peft_config.router,
        "num_experts": some.neuron_index.shape[0],
        "top_k": peft_config.top_k,
        "expert_dim": some.neuron_index.shape[1],
        "shared_neurons": peft_config.shared_neurons,
        "ffn_dim": some.parts.ffn_dim,
        "routing_granularity": peft_config.routing_granularity,
        "distill_coef": args.distill_coef,
        "processes": training_args.world_size,
    }
    trainer.save_metrics("all", results, combined=False)  # all_results.json, on the main process
    if training_args.push_to_hub:
        trainer.push_to_hub(
            finetuned_from=args.model_name_or_path, dataset=run.hub_dataset, tags=["hf_condroute", "moebert"]
        )
    return trainer, results


def main(argv: list[str] | None = None) -> dict:
    with usage_errors():
        args, training_args = parse_arguments(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    results = train_and_evaluate(args, training_args)[1]
    end_distributed()
    return results


if __name__ == "__main__":
    run_recipe(main)
