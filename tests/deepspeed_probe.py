"""The three routed tuners under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (`torchrun --nproc_per_node 2
tests/deepspeed_probe.py OUT`), with `deepspeed.initialize` and with the stock Trainer given a DeepSpeed config dict.
Each rank routes its examples to other experts, and some experts get no example at all. Rank 0 writes, per case, the
parameters DeepSpeed ended with, those of the same steps taken in one process and the initial ones (`params.pt`),
and what each way of saving under ZeRO-3 did (`saves.json`, and the folders saved)."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {"adapter_tag": ("adapter", "tag"), "lora_hash": ("lora", "hash"), "ffn_top_k": ("ffn", "top_k")}
STEPS = 3
LR = 0.05
MOMENTUM = {"engine": 0.9, "trainer": 0.0}  # the Trainer's `optim="sgd"` has none


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # threshold 0: every parameter is partitioned, however small (ZeRO-3 keeps those under 1e5 elements whole)
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def build(case: str):
    from peft import get_peft_model

    from hf_condroute import RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig
    from tests.conftest import make_bert

    tuner, router = CASES[case]
    # one expert per example, 2 examples per process: each process leaves at least 2 of the 4 experts unused
    common = dict(num_experts=4, router=router, top_k=1, routing_granularity="example", task_type="SEQ_CLS")
    config = {
        "adapter": lambda: RoutedAdapterConfig(adapter_dim=8, **common),
        "lora": lambda: RoutedLoraConfig(r=4, init_lora_weights=False, **common),
        "ffn": lambda: RoutedFFNConfig(init_weights=False, **common),
    }[tuner]()
    return get_peft_model(make_bert(seed=3), config).train()


def micro_batch(rank: int, step: int) -> dict:
    from tests.conftest import bert_batch

    batch = bert_batch(batch=2, seed=100 * step + rank)
    # tag routing: rank 0 uses experts 0 and 1, rank 1 only expert 2, and expert 3 no rank
    batch["routing_tags"] = torch.tensor([0, 1]) if rank == 0 else torch.tensor([2, 2])
    return batch


def sgd(model, momentum: float):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=momentum)


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_process(case: str, world: int, momentum: float) -> dict:
    """The same steps in one process: each rank's micro-batch in turn, gradients averaged, one optimizer step."""
    model = build(case)
    opt = sgd(model, momentum)
    for step in range(STEPS):
        for rank in range(world):
            model(**micro_batch(rank, step)).loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= world
        opt.step()
        opt.zero_grad()
    return trainable(model)


def save_attempts(model, engine, out: str, rank: int) -> dict:
    """Each way of saving a ZeRO-3 adapter: refused where it would be incomplete, whole where it is gathered."""
    import deepspeed

    outcome = {}

    def attempt(kind: str, **kwargs):
        folder = os.path.join(out, kind)
        try:
            model.save_pretrained(folder, **kwargs)
            outcome[kind] = "saved"
        except ValueError as e:
            outcome[kind] = f"refused: {e}"
        outcome[f"{kind}_files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    if rank == 0:  # as a script that saves on the main process only would
        attempt("plain")
        attempt("empty_state_dict", state_dict={})
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # a collective: every process
    if rank == 0:
        attempt("consolidated", state_dict=state_dict)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # every process
        attempt("gathered", is_main_process=rank == 0)
    return outcome


def with_engine(case: str, stage: int, out: str) -> tuple[dict, dict]:
    import deepspeed

    model = build(case)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd(model, MOMENTUM["engine"]), config=ds_config(stage))
    rank = torch.distributed.get_rank()
    for step in range(STEPS):
        engine.backward(engine(**micro_batch(rank, step)).loss)
        engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # a no-op under ZeRO-2
        params = trainable(model)
    saves = save_attempts(model, engine, os.path.join(out, f"{case}_zero{stage}"), rank) if stage == 3 else {}
    return params, saves


def with_trainer(case: str, stage: int, out: str, world: int) -> dict:
    """The stock Trainer with a DeepSpeed config dict on CPU processes, saving with `save_model`. The rows are in
    order, so that rank r's micro-batch of step t is `micro_batch(r, t)` (accelerate gives each process every
    world-th batch)."""
    import deepspeed
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    rows = []
    for step in range(STEPS):
        for rank in range(world):
            batch = micro_batch(rank, step)
            rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    model = build(case)
    folder = os.path.join(out, f"trainer_{case}_zero{stage}")
    args = TrainingArguments(
        folder, deepspeed=ds_config(stage), use_cpu=True, per_device_train_batch_size=2, max_steps=STEPS,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, train_sampling_strategy="sequential", save_strategy="no", report_to="none",
        logging_steps=STEPS, disable_tqdm=True, dataloader_pin_memory=False,
        # BERT's forward takes **kwargs but its loss ignores `num_items_in_batch`, so with this on (the default) the
        # Trainer would multiply each process's mean loss by the number of processes (Adam would not show it)
        average_tokens_across_devices=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(folder)  # gathers the partitioned adapter under ZeRO-3
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        params = trainable(model)
    AcceleratorState._reset_state(reset_partial_state=False)  # the next Trainer sets up its own DeepSpeed plugin
    return params


if __name__ == "__main__":
    import deepspeed

    from hf_condroute.integrations.deepspeed import skip_cpu_shm_comm_build
    from hf_condroute.integrations.distributed import end_distributed

    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    out = sys.argv[1]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    params, saves = {}, {}
    for case in CASES:
        for stage in (2, 3):
            params[f"{case}/zero{stage}"], saves[f"{case}/zero{stage}"] = with_engine(case, stage, out)
        if rank == 0:
            params[f"{case}/one"] = one_process(case, world, MOMENTUM["engine"])
            params[f"{case}/init"] = trainable(build(case))
    for case in CASES:
        for stage in (2, 3):
            params[f"trainer_{case}/zero{stage}"] = with_trainer(case, stage, out, world)
        if rank == 0:
            params[f"trainer_{case}/one"] = one_process(case, world, MOMENTUM["trainer"])
    if rank == 0:
        torch.save(params, os.path.join(out, "params.pt"))
        with open(os.path.join(out, "saves.json"), "w") as f:
            json.dump(saves, f, indent=1)
    end_distributed()
