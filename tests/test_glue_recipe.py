"""recipes/glue.py end to end on a tiny random T5 and tiny GLUE-shaped data: one process in this process, two
processes under `accelerate launch` (DDP on CPU), resuming, warm-starting experts, and the errors it gives."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from datasets import load_from_disk
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from hf_condroute.integrations.distributed import check_process_count
from hf_condroute.integrations.warm_start import load_experts_from
from hf_condroute.studies.glue import GLUE_TASK_NAMES, glue_average

from .glue_fixtures import save_tiny_glue, save_tiny_t5
from .launch_helpers import run_launch
from .recipe_loader import load_recipe

recipe = load_recipe("glue")
PROBE = Path(__file__).resolve().parent / "glue_ddp_probe.py"
EVAL_ROWS = 5  # not a multiple of the 2 x 4 evaluation batch: the last batch is padded across processes
SOME_TASKS = ["cola", "stsb", "mnli", "rte"]  # each metric kind, for the runs that need not cover all eight
BLOCKS = 8  # 2 encoder + 2 decoder layers, after self-attention and after the feed-forward


def eval_sets(tasks) -> list[str]:
    return [s for t in tasks for s in (["mnli_matched", "mnli_mismatched"] if t == "mnli" else [t])]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("glue_recipe")
    return save_tiny_glue(str(base / "glue"), train_rows=8, eval_rows=EVAL_ROWS), save_tiny_t5(str(base / "t5"))


def flags(assets, output_dir, routing="tag", steps=3, batch=4, *extra, tasks=SOME_TASKS, eval_batch=8) -> list[str]:
    data_dir, model_dir = assets
    return [
        "--model_name_or_path", model_dir, "--data_dir", data_dir, "--routing", routing,
        "--output_dir", str(output_dir),
        "--tasks", *tasks, "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
        "--per_device_eval_batch_size", str(eval_batch),
        "--warmup_steps", "0", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--seed", "7",
        *extra,
    ]  # fmt: skip


def read_results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as f:
        return json.load(f)


def check_results(results: dict, routing: str, tasks=SOME_TASKS) -> None:
    per_set = {}
    for name in eval_sets(tasks):
        assert results[f"eval_{name}_samples"] == EVAL_ROWS  # duplicates padded in by DDP are dropped
        metrics = {k.removeprefix(f"eval_{name}_"): v for k, v in results.items() if k.startswith(f"eval_{name}_")}
        per_set[name] = metrics
    official = {"cola": {"matthews_correlation"}, "stsb": {"pearson", "spearmanr"}, "mrpc": {"f1", "accuracy"},
                "qqp": {"f1", "accuracy"}, "rte": {"accuracy"}, "mnli_matched": {"accuracy"}}  # fmt: skip
    assert all(official[name] <= set(metrics) for name, metrics in per_set.items() if name in official)
    assert results["eval_glue_average"] == pytest.approx(glue_average(per_set))
    routing_stats = results["routing"]
    assert routing_stats["examples"] == EVAL_ROWS * len(per_set)
    assert len(routing_stats["blocks"]) == BLOCKS
    assert 0.0 <= routing_stats["focus"] <= 1.0 and 0.0 <= routing_stats["cover"] <= 1.0
    assert results["routing_setup"]["routing"] == routing


@pytest.fixture(scope="module")
def tag_run(assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("tag")
    return output_dir, recipe.main(flags(assets, output_dir, tasks=GLUE_TASK_NAMES))


def test_tag_routing_one_process_all_eight_tasks(tag_run):
    output_dir, results = tag_run
    check_results(read_results(output_dir), "tag", GLUE_TASK_NAMES)
    # every task has its own expert in every block
    assert results["routing"]["focus"] == 1.0 and results["routing"]["cover"] == 1.0
    saved = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    # layer norms train and travel with the adapter; the experts moved away from their zero init
    assert sum("layer_norm" in k for k in saved) == 2 * 2 + 1 + 3 * 2 + 1
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("experts.up_weight"))


def test_tag_plus_sends_rte_to_mnli_in_the_encoder_only(assets, tmp_path):
    results = recipe.main(flags(assets, tmp_path, "tag_plus", 1, 4, tasks=["mnli", "rte"]))
    mnli, rte = GLUE_TASK_NAMES.index("mnli"), GLUE_TASK_NAMES.index("rte")
    for name, block in results["routing"]["blocks"].items():
        if name.startswith("encoder."):
            assert block["load"][rte] == 0.0 and block["load"][mnli] == 1.0
        else:
            assert block["load"][mnli] == pytest.approx(2 / 3) and block["load"][rte] == pytest.approx(1 / 3)


def test_reinforce_with_tag_supervision_trains_its_routers(assets, tmp_path):
    results = recipe.main(flags(assets, tmp_path, "reinforce", 3, 4, "--tag_supervision_fraction", "0.5"))
    check_results(results, "reinforce")
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    # no task gradient reaches a REINFORCE router: its zero-initialised bias moved through the policy, entropy
    # and tag-supervision losses, and the baseline's zero-initialised last layer through the value loss
    biases = [v for k, v in saved.items() if k.endswith("router.network.proj.bias")]
    baselines = [v for k, v in saved.items() if k.endswith("router.baseline.net.2.weight")]
    assert len(biases) == len(baselines) == BLOCKS
    assert all(b.abs().sum() > 0 for b in biases) and all(b.abs().sum() > 0 for b in baselines)


def test_resume_ends_where_the_uninterrupted_run_ends(assets, tmp_path):
    # a stochastic router with tag supervision: the resumed run must also restore RNG and data order
    extra = ["--tag_supervision_fraction", "0.5", "--save_strategy", "steps", "--save_steps", "2"]
    whole = recipe.main(flags(assets, tmp_path / "whole", "reinforce", 4, 4, *extra, tasks=["rte", "stsb"]))
    resume = ["--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2")]
    resumed = recipe.main(
        flags(assets, tmp_path / "resumed", "reinforce", 4, 4, *extra, *resume, tasks=["rte", "stsb"])
    )
    a = load_file(os.path.join(tmp_path / "whole", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "resumed", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed["eval_glue_average"] == whole["eval_glue_average"]


def test_init_experts_from_a_tag_run_keeps_routers_fresh(assets, tag_run):
    tag_dir, _ = tag_run
    args, _ = recipe.parse_arguments(
        flags(assets, tag_dir / "unused", "top_k", 1, 4, "--init_experts_from", str(tag_dir))
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(assets[1]), recipe.routed_adapter_config(args, 64))
    fresh = {k: v.clone() for k, v in get_peft_model_state_dict(model).items() if ".router." in k}
    assert fresh
    copied = load_experts_from(model, str(tag_dir))
    saved = load_file(os.path.join(tag_dir, "adapter_model.safetensors"))  # a tag run has no router weights
    assert sorted(copied) == sorted(saved)
    state = get_peft_model_state_dict(model)
    for key, value in fresh.items():
        torch.testing.assert_close(state[key], value, msg=key)
    for key in saved:
        torch.testing.assert_close(state[key], saved[key], msg=key)


def _break_data(data_dir, tmp_path, problem):
    broken = str(tmp_path / "broken")
    shutil.copytree(data_dir, broken)
    if problem == "missing task":
        shutil.rmtree(os.path.join(broken, "rte"))
    else:
        mrpc = load_from_disk(os.path.join(data_dir, "mrpc"))
        del mrpc["validation"]
        shutil.rmtree(os.path.join(broken, "mrpc"))
        mrpc.save_to_disk(os.path.join(broken, "mrpc"))
    return broken


@pytest.mark.parametrize(
    "problem, message",
    [
        ("bad routing", "--routing 'tga' is not a routing. Choose one of: tag, hash"),
        ("missing task", "rte: no folder"),
        ("missing split", "mrpc: no split 'validation'"),
        ("too few experts for tags", "needs --num_experts 8 or more"),
        ("supervising a heuristic router", "has no router to train"),
        ("no checkpoint to start experts from", "holds no adapter_config.json"),
    ],
)
def test_bad_input_fails_before_training(assets, tmp_path, problem, message):
    data_dir, _ = assets
    routing, extra = "tag", []
    if problem == "bad routing":
        routing = "tga"
    elif problem in ("missing task", "missing split"):
        data_dir = _break_data(data_dir, tmp_path, problem)
    elif problem == "too few experts for tags":
        extra = ["--num_experts", "4"]
    elif problem == "supervising a heuristic router":
        routing, extra = "hash", ["--tag_supervision_fraction", "0.1"]
    else:
        routing, extra = "top_k", ["--init_experts_from", str(tmp_path)]
    # a model path that does not exist: the error must come before the model is loaded
    argv = flags((data_dir, str(tmp_path / "no_model")), tmp_path / "out", routing, 2, 4, *extra, tasks=GLUE_TASK_NAMES)
    with pytest.raises((ValueError, RuntimeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe.main(argv)
    assert not os.path.exists(tmp_path / "out")


def test_process_count_mismatches_are_errors(monkeypatch):
    class Args:
        world_size = 1

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="started a single process"):
        check_process_count(Args())
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--use_cpu"):
        check_process_count(Args())
    Args.world_size = 2
    check_process_count(Args())
    # an FSDP config on CPU processes: accelerate falls back to DDP, which is right but not what was asked
    Args.distributed_state = type("State", (), {"distributed_type": DistributedType.MULTI_CPU})()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.warns(UserWarning, match="FSDP was asked for"):
        check_process_count(Args())


def launch(script, argv, timeout=240, launcher=("--multi_gpu",)) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), *argv, "--use_cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_launch(cmd, env, timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_processes_tag_routing_matches_one_process(assets, tag_run, tmp_path):
    # DDP over 2 x 2 examples takes the steps one process takes over 4: experts that no example of a
    # process chose still get their (zero) gradient, and the token-weighted loss averages exactly
    tag_dir, _ = tag_run
    launch(PROBE, flags(assets, tmp_path, "tag", 3, 2, tasks=GLUE_TASK_NAMES, eval_batch=4))
    results = read_results(tmp_path)
    check_results(results, "tag", GLUE_TASK_NAMES)
    assert results["routing_setup"]["processes"] == 2
    one = load_file(os.path.join(tag_dir, "adapter_model.safetensors"))
    two = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    for key in one:
        # MKL's float32 sums depend on memory alignment, so the in-process run differs from the launched one by
        # rounding, which Adam's g / sqrt(v) scales up on near-zero gradients (seen: 4.4e-5 on one tensor after 3
        # steps); a wrong average or a missing expert gradient moves weights by about lr = 1e-2
        torch.testing.assert_close(two[key], one[key], atol=2e-4, rtol=1e-3, msg=key)
    assert_ranks_in_sync(tmp_path)


def assert_ranks_in_sync(output_dir) -> None:
    rank0, rank1 = (torch.load(os.path.join(output_dir, f"rank{i}_state.pt")) for i in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=key)


def test_two_processes_reinforce_stays_in_sync(assets, tmp_path):
    # routers, REINFORCE baselines and their BatchNorm statistics end identical on both processes
    launch(PROBE, flags(assets, tmp_path, "reinforce", 3, 2, "--tag_supervision_fraction", "0.5", eval_batch=4))
    check_results(read_results(tmp_path), "reinforce")
    assert_ranks_in_sync(tmp_path)
    assert any(k.endswith("router.baseline.net.2.weight") for k in torch.load(tmp_path / "rank0_state.pt"))


def test_push_to_hub_sends_the_card_metadata_and_routing_files(assets, tmp_path, monkeypatch):
    # the Hub cannot be reached: stop at the Trainer's boundary and check what would be uploaded
    from hf_condroute.studies.glue.seq2seq import GlueSeq2SeqTrainer

    pushes = []
    monkeypatch.setattr(GlueSeq2SeqTrainer, "init_hf_repo", lambda self, token=None: None)
    monkeypatch.setattr(GlueSeq2SeqTrainer, "push_to_hub", lambda self, **kwargs: pushes.append(kwargs))
    recipe.main(flags(assets, tmp_path, "tag", 1, 4, "--push_to_hub", "--hub_model_id", "me/glue-tag", tasks=["rte"]))
    assert pushes[-1]["finetuned_from"] == assets[1] and pushes[-1]["dataset"] == "nyu-mll/glue"
    assert {"all_results.json", "routing_stats.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "routing_stats.json") as f:
        saved = json.load(f)
    # saved after evaluating: the evaluation's statistics travel with the adapter
    assert saved["splits"]["eval"]["examples"] == EVAL_ROWS and saved["splits"]["eval"]["focus"] is not None
