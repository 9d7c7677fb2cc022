"""Training routed models on several processes: catching launches that are not what the user asked for, and
keeping routers' BatchNorm statistics the same on every process.

Launches that start a different number of training processes than the user asked for:
Two launches look fine and are not:
- `accelerate launch --cpu --num_processes N` (accelerate 1.x) starts one process: it runs several CPU processes
  only through mpirun (`--mpirun_hostfile`). It still sets MASTER_ADDR, which is how the request shows.
- `torchrun`/`accelerate launch --multi_gpu` on a machine without GPUs starts N processes, but transformers
  only joins them for DDP with `--use_cpu`: otherwise each trains alone on all the data and they overwrite
  each other's output.
- an FSDP accelerate config on CPU processes: accelerate shards only across GPUs (and other accelerators) and
  silently trains with DDP instead; the results are right, so this one is a warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainerCallback

from .block import ROUTER_KEY

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_LAUNCH_HINT = (
    "To train on N CPU processes run `accelerate launch --multi_gpu --num_processes N SCRIPT ... --use_cpu` (or "
    "`torchrun --nproc_per_node N SCRIPT ... --use_cpu`)."
)


def launched_world_size() -> int:
    for name in _WORLD_SIZE_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def check_process_count(training_args) -> None:
    """Raise a clear error when the processes started are not the ones that will train together."""
    started = launched_world_size()
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu_launch and started == 1 and os.environ.get("MASTER_ADDR"):
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` started a single process: accelerate runs several CPU "
            f"processes only through mpirun (--mpirun_hostfile). {CPU_LAUNCH_HINT} Leave out --num_processes to "
            "train on one process."
        )
    state = getattr(training_args, "distributed_state", None)
    asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or bool(getattr(training_args, "fsdp", None))
    if asked_fsdp and state is not None and state.distributed_type != DistributedType.FSDP:
        warnings.warn(
            f"FSDP was asked for, but accelerate set up {state.distributed_type} (it shards only across GPUs and other "
            "accelerators, not CPU processes): training runs with plain data parallelism instead.",
            stacklevel=2,
        )
    if started > 1 and training_args.world_size != started:
        raise RuntimeError(
            f"{started} processes were started, but transformers runs them as {training_args.world_size} training "
            f"process(es) (no GPU found and --use_cpu not given), so each would train alone on all the data. "
            f"{CPU_LAUNCH_HINT}"
        )


def average_router_statistics(model: nn.Module) -> None:
    """Average the routers' floating-point buffers (BatchNorm running mean and variance) over all processes.

    DDP computes BatchNorm's batch statistics on each process's own examples and then keeps rank 0's running
    statistics (it broadcasts buffers before each forward); without this, processes would evaluate with
    different statistics, and the statistics would only ever see rank 0's examples.
    """
    all_reduce_([b for name, b in model.named_buffers() if ROUTER_KEY in name and b.is_floating_point()], average=True)


def all_reduce_(tensors: list[torch.Tensor], average: bool = False, device=None) -> None:
    """Sum (or average) `tensors` in place over all processes, in one float32 all_reduce on `device` (default:
    the tensors' own; NCCL needs a GPU one). Nothing happens with a single process."""
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(device or tensors[0].device)
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    for tensor, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(value.view_as(tensor))


class SyncRouterStatisticsCallback(TrainerCallback):
    """Averages the routers' BatchNorm statistics over processes after every optimizer step, so evaluation and
    checkpoints use statistics of every process's examples, the same on each process."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            average_router_statistics(model)
