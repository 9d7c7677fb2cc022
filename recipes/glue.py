"""T5 with routed adapters on GLUE: paper A's T5-GLUE scenario, every routing, one or many processes.

The eight GLUE tasks (no WNLI) cast as text-to-text as T5 does, trained as one multi-task run; the backbone
frozen except its layer norms; 8 routed adapters of size d_model/32 after every self-attention and
feed-forward of encoder and decoder; an example's routing tag is its task. Evaluation generates each answer and
scores every task with its official metric, plus the GLUE average; `all_results.json` holds them all with the
routing statistics (Focus/Cover over tasks, expert load per block), which also go to `routing_stats.json` and
the model card beside the saved adapter.

    accelerate launch recipes/glue.py --routing tag --output_dir runs/tag --max_steps 20000
    accelerate launch --num_processes 2 recipes/glue.py --routing top_k --tag_supervision_fraction 0.01 \\
        --output_dir runs/top_k_sup                                                    # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 recipes/glue.py --use_cpu ...      # 2 CPU processes
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 recipes/glue.py --use_cpu ...  # sharded (FSDP2)
    python recipes/glue.py --routing reinforce --init_experts_from runs/tag --output_dir runs/reinforce_init
    python recipes/glue.py --data_dir my_glue --max_train_samples_per_task 1000 ...   # local save_to_disk data

`--routing` is any name of `hf_condroute.ROUTERS` or `tag_plus` (paper A's Tag+: RTE uses MNLI's expert in the
encoder). Every `Seq2SeqTrainingArguments` flag works as usual; the defaults follow the paper (lr 3e-4 with
warm-up, label smoothing 0.1, batch 128).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import transformers
from datasets import concatenate_datasets
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hf_condroute
from hf_condroute import RoutedAdapterConfig, RoutingStatsCallback, get_routing_stats
from hf_condroute.integrations.distributed import (
    SyncRouterStatisticsCallback,
    allow_fsdp2_on_cpu,
    check_process_count,
    end_distributed,
    share_tied_embedding_module,
)
from hf_condroute.integrations.trainer_loss import RoutedTokenLoss
from hf_condroute.integrations.warm_start import check_expert_checkpoint, load_experts_from
from hf_condroute.routers import router_class
from hf_condroute.studies.cli import TRAINING_LOWS, check_at_least, from_the_hub, run_recipe, usage_errors
from hf_condroute.studies.glue import GLUE_TASK_NAMES, get_task, get_tasks, load_glue, take
from hf_condroute.studies.glue.seq2seq import GlueEvalSet, GlueSeq2SeqTrainer
from hf_condroute.studies.glue.text_to_text import tokenize_for_t5

logger = logging.getLogger(__name__)

TAG_PLUS = "tag_plus"
ENCODER_BLOCKS = r"(^|\.)encoder\."  # T5 encoder block names (the decoder's cross-attention is `EncDecAttention`)


@dataclass
class GlueRecipeArguments:
    model_name_or_path: str = field(default="t5-small", metadata={"help": "A T5 checkpoint (Hub name or folder)."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with one `save_to_disk` DatasetDict per task, named by the Hub's GLUE config names (cola, "
            "sst2, mrpc, qqp, stsb, mnli, qnli, rte), with the Hub's splits and columns. Default: load nyu-mll/glue."
        },
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": f"GLUE tasks to train and evaluate on (default all: {' '.join(GLUE_TASK_NAMES)})."},
    )
    routing: str = field(
        default="tag",
        metadata={
            "help": "A router of hf_condroute.ROUTERS, or tag_plus (Tag+: RTE shares MNLI's expert in the encoder)."
        },
    )
    num_experts: int = field(default=8, metadata={"help": "Adapters per routed block (paper A: 8, one per task)."})
    top_k: int = field(default=1, metadata={"help": "Adapters each example runs through (learned routers)."})
    adapter_dim: int | None = field(default=None, metadata={"help": "Adapter bottleneck size (default d_model/32)."})
    routing_granularity: str = field(default="example", metadata={"help": "example (paper A) or token."})
    router_init_std: float = field(default=0.01, metadata={"help": "Std of router weights: small logits at start."})
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss weight."})
    tag_supervision_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of training examples whose router is trained to pick its task's expert (paper A 4.4); "
            "learned routers only."
        },
    )
    tag_supervision_coef: float = field(default=1.0, metadata={"help": "Weight of that cross-entropy."})
    init_experts_from: str | None = field(
        default=None,
        metadata={
            "help": "A routed-adapter checkpoint (e.g. a tag-routing run) whose experts and layer norms start this "
            "run; routers start fresh (paper A 4.3)."
        },
    )
    max_train_samples_per_task: int | None = field(
        default=None, metadata={"help": "First N training rows of each task."}
    )
    max_eval_samples_per_task: int | None = field(
        default=None, metadata={"help": "First N rows of each evaluation set."}
    )
    max_source_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})


@dataclass
class GlueTrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with paper A's T5-GLUE defaults."""

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (paper A: 3e-4)."})
    warmup_steps: float = field(default=500, metadata={"help": "Warm-up steps (a float < 1: share of all steps)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing (paper A: 0.1)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per process (paper A: 128)."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per process."})
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluate on generated answers."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Expert banks stack their experts' weights, so every trainable parameter gets a gradient."},
    )


RECIPE_LOWS = {
    "num_experts": 1,
    "top_k": 1,
    "adapter_dim": 1,
    "router_init_std": 0,
    "router_aux_loss_coef": 0,
    "router_z_loss_coef": 0,
    "tag_supervision_coef": 0,
    "max_train_samples_per_task": 1,
    "max_eval_samples_per_task": 1,
    "max_source_length": 1,
}
MODEL_OPTION = "--model_name_or_path (a local save_pretrained folder of a T5)"


def check_routing_arguments(args: GlueRecipeArguments) -> None:
    """Every mistake in the routing flags, found before any data or model is loaded."""
    valid = [*hf_condroute.ROUTERS, TAG_PLUS]
    if args.routing not in valid:
        raise ValueError(f"--routing {args.routing!r} is not a routing. Choose one of: {', '.join(valid)}.")
    router = router_class("tag" if args.routing == TAG_PLUS else args.routing)
    if router.needs_tags and args.num_experts < len(GLUE_TASK_NAMES):
        raise ValueError(
            f"--routing {args.routing} gives each GLUE task its own expert (tags 0..{len(GLUE_TASK_NAMES) - 1}), so it "
            f"needs --num_experts {len(GLUE_TASK_NAMES)} or more (got {args.num_experts})."
        )
    if not 0.0 <= args.tag_supervision_fraction <= 1.0:
        raise ValueError(f"--tag_supervision_fraction must be in [0, 1], got {args.tag_supervision_fraction}.")
    if args.tag_supervision_fraction > 0:
        if not router.learned:
            raise ValueError(
                f"--tag_supervision_fraction trains a learned router to follow tags; --routing {args.routing} has no "
                "router to train. Use a learned router (top_k, st_gumbel, reinforce, ...)."
            )
        if args.num_experts < len(GLUE_TASK_NAMES):
            raise ValueError(
                f"Tag supervision sends each task to its own expert: it needs --num_experts {len(GLUE_TASK_NAMES)} or "
                f"more (got {args.num_experts})."
            )
    if args.init_experts_from is not None:
        check_expert_checkpoint(args.init_experts_from)
    routed_adapter_config(args, d_model=512)  # every routing field, checked by the config itself (d_model: any)


def routed_adapter_config(args: GlueRecipeArguments, d_model: int) -> RoutedAdapterConfig:
    router = "tag" if args.routing == TAG_PLUS else args.routing
    pattern = None
    if args.routing == TAG_PLUS:
        mapping = [get_task(name).tag for name in GLUE_TASK_NAMES]
        mapping[get_task("rte").tag] = get_task("mnli").tag
        pattern = {ENCODER_BLOCKS: mapping}
    return RoutedAdapterConfig(
        task_type="SEQ_2_SEQ_LM",
        router=router,
        num_experts=args.num_experts,
        top_k=args.top_k,
        adapter_dim=args.adapter_dim or max(1, d_model // 32),
        routing_granularity=args.routing_granularity,
        router_init_std=args.router_init_std,
        router_aux_loss_coef=args.router_aux_loss_coef,
        router_z_loss_coef=args.router_z_loss_coef,
        tag_supervision_coef=args.tag_supervision_coef if args.tag_supervision_fraction > 0 else 0.0,
        tag_to_expert_pattern=pattern,
        # layer norms train too (paper A), as PEFT's trainable copies saved with the adapter: `layer_norm` ends
        # every T5 layer norm's name (`final_layer_norm` included)
        modules_to_save=["layer_norm"],
    )


def supervise_fraction(dataset, fraction: float, seed: int):
    """Keep the routing tag of a random `fraction` of the rows (fixed for the run); -100 for the others."""
    if fraction >= 1.0:
        return dataset
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(dataset), dtype=bool)
    keep[rng.choice(len(dataset), size=round(fraction * len(dataset)), replace=False)] = True
    tags = np.where(keep, np.asarray(dataset["routing_tags"]), -100)
    return dataset.remove_columns("routing_tags").add_column("routing_tags", tags.tolist())


def build_datasets(args: GlueRecipeArguments, training_args, tokenizer, tasks: list, raw: dict):
    train_parts, eval_sets = [], {}
    for task in tasks:
        data = raw[task.name]
        train_parts.append(
            tokenize_for_t5(
                task, take(data[task.train_split], args.max_train_samples_per_task), tokenizer, args.max_source_length
            )
        )
        for name, split in task.eval_splits:
            rows = take(data[split], args.max_eval_samples_per_task)
            eval_sets[name] = GlueEvalSet(
                task, tokenize_for_t5(task, rows, tokenizer, args.max_source_length), rows["label"]
            )
    train = concatenate_datasets(train_parts)
    if args.tag_supervision_fraction > 0:  # learned routers only: check_routing_arguments rejects the others
        train = supervise_fraction(train, args.tag_supervision_fraction, training_args.seed)
    return train, eval_sets


def parse_arguments(argv: list[str] | None = None) -> tuple[GlueRecipeArguments, GlueTrainingArguments]:
    """Flags (or one .json/.yaml file of them), checked before any data or model is loaded."""
    parser = HfArgumentParser((GlueRecipeArguments, GlueTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        args, training_args = parser.parse_json_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        args, training_args = parser.parse_yaml_file(argv[0])
    else:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    allow_fsdp2_on_cpu()  # an FSDP2 accelerate config shards CPU processes too, not only GPUs
    check_process_count(training_args)
    check_at_least(training_args, TRAINING_LOWS)
    check_at_least(args, RECIPE_LOWS)
    check_routing_arguments(args)
    return args, training_args


def train_and_evaluate(args: GlueRecipeArguments, training_args: GlueTrainingArguments):
    """Load (and check) the data, build the routed model, train, evaluate; returns (trainer, results)."""
    tasks = get_tasks(args.tasks)
    with training_args.main_process_first(desc="loading GLUE"), usage_errors():
        raw = load_glue(tasks, args.data_dir)  # every data problem is reported before the model is loaded
    with usage_errors(), from_the_hub("the model", args.model_name_or_path, MODEL_OPTION):
        model_config = AutoConfig.from_pretrained(args.model_name_or_path)  # a small file: fails before the weights

    set_seed(training_args.seed)
    with usage_errors(), from_the_hub("the tokenizer", args.model_name_or_path, MODEL_OPTION):
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    peft_config = routed_adapter_config(args, model_config.d_model)
    with usage_errors(), from_the_hub("the model", args.model_name_or_path, MODEL_OPTION):
        base = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path)
    model = get_peft_model(base, peft_config)
    if args.init_experts_from is not None:
        copied = load_experts_from(model, args.init_experts_from)
        logger.info(
            "Copied %d expert and layer-norm tensors from %s; routers start fresh.", len(copied), args.init_experts_from
        )
    model.print_trainable_parameters()

    with training_args.main_process_first(desc="casting GLUE as text-to-text"):
        train_dataset, eval_sets = build_datasets(args, training_args, tokenizer, tasks, raw)

    trainer = GlueSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        glue_eval_sets=eval_sets,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        # the Trainer pops `labels` to smooth them, so this loss adds routing losses and REINFORCE rewards itself
        compute_loss_func=RoutedTokenLoss(model, label_smoothing=training_args.label_smoothing_factor),
        callbacks=[SyncRouterStatisticsCallback()],
    )
    # routing statistics in the Trainer's logs, collapse warnings, routing_stats.json and the model card
    RoutingStatsCallback(tags_per_group=len(GLUE_TASK_NAMES), tag_names=GLUE_TASK_NAMES).attach(trainer)
    share_tied_embedding_module(trainer.model, trainer.accelerator)  # FSDP2 only: T5 ties its embedding 4 ways
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results = {**train_result.metrics, "train_samples": len(train_dataset)}
    results.update(trainer.evaluate())
    if trainer.is_fsdp_enabled:  # FSDP2 keeps sharded state dicts, and save_model saves no adapter from them
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()  # after evaluating: routing_stats.json and the model card hold the evaluation's statistics
    trainer.save_state()
    eval_stats = get_routing_stats(trainer.model).get("eval")
    results["routing"] = eval_stats.to_dict() if eval_stats is not None else {}
    results["routing_setup"] = {
        "routing": args.routing,
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "adapter_dim": peft_config.adapter_dim,
        "tag_supervision_fraction": args.tag_supervision_fraction,
        "init_experts_from": args.init_experts_from,
        "processes": training_args.world_size,
    }
    trainer.save_metrics("all", results, combined=False)  # all_results.json, on the main process
    card = {"finetuned_from": args.model_name_or_path, "dataset": "nyu-mll/glue", "tasks": "text2text-generation"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # README.md with the routing section, routing_stats.json, heatmaps, results
    else:
        trainer.create_model_card(**card)
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
