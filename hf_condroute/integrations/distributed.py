"""Training routed models on several processes: catching launches that are not what the user asked for, sharding
CPU processes with FSDP2, and keeping routers' BatchNorm statistics the same on every process.

Launches that start a different number of training processes than the user asked for:
- `accelerate launch --cpu --num_processes N` (accelerate 1.x) starts one process: it runs several CPU processes
  only through mpirun (`--mpirun_hostfile`). It still sets MASTER_ADDR, which is how the request shows.
- `torchrun`/`accelerate launch --multi_gpu` on a machine without GPUs starts N processes, but transformers
  only joins them for DDP with `--use_cpu`: otherwise each trains alone on all the data and they overwrite
  each other's output.

FSDP on CPU processes (`accelerate launch --use_fsdp --fsdp_version 2 --num_processes N SCRIPT ... --use_cpu`):
accelerate sets up FSDP only across GPUs and other accelerators and silently trains CPU processes with DDP,
although FSDP2 (`fully_shard`) runs on CPU with gloo. `allow_fsdp2_on_cpu()` lets accelerate choose FSDP2 there
too, and its own FSDP2 code then shards every parameter (stacked expert tensors, routers and the frozen base
alike, each along its first dimension) and the optimizer states. `share_tied_embedding_module()` works around
accelerate's FSDP2 preparation failing on T5's four-way tied embedding (on GPUs too). A script must save with a
full state dict (`fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")` before `save_model`), or the Trainer saves
no adapter under FSDP2's default sharded state dict. An FSDP1 config on CPU processes, or FSDP2 in a script that
does not call `allow_fsdp2_on_cpu()`, still trains with DDP: the results are right, so that is a warning.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainerCallback

from ..block.routed_block import ROUTER_KEY

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


def requested_fsdp_version(training_args) -> int | None:
    """The FSDP version the launch asked for (an accelerate FSDP config, or the Trainer's `--fsdp`), or None."""
    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    if plugin_args:
        return int(plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


_CPU_FSDP2_ALLOWED = False


def allow_fsdp2_on_cpu() -> None:
    """Let accelerate set up FSDP2 on CPU processes, as it does on GPUs; call it before the Trainer is built.

    accelerate (1.x) turns an FSDP config into `DistributedType.FSDP` only for GPUs and other accelerators and
    leaves CPU processes on DDP, although `torch.distributed.fsdp.fully_shard` runs on CPU with gloo. This opens
    that one gate: when accelerate's state comes out as `MULTI_CPU` with an FSDP2 plugin, it becomes `FSDP` with
    that plugin, and from there accelerate's and the Trainer's own FSDP2 code (sharding in `prepare`, gradient
    clipping, FSDP checkpoints, the full state dict for `save_model`) runs unchanged. FSDP1 is left alone (it needs
    a device per process). Once accelerate sets up FSDP on CPU itself, this does nothing (checked against
    accelerate 1.16, whose `AcceleratorState` sets FSDP only in its branch for accelerators). Calling it twice is fine.
    """
    global _CPU_FSDP2_ALLOWED
    if _CPU_FSDP2_ALLOWED:
        return
    from accelerate.state import AcceleratorState, PartialState

    original_init = AcceleratorState.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (
            self.distributed_type == DistributedType.MULTI_CPU
            and fsdp_plugin is not None
            and fsdp_plugin.fsdp_version == 2
        ):
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__
    _CPU_FSDP2_ALLOWED = True


def share_tied_embedding_module(model: nn.Module, accelerator) -> None:
    """Under FSDP2, make every module that holds the input embedding's weight the input embedding module itself
    (the model's own `set_input_embeddings`); call it after the Trainer is built and before `train()`.

    T5 ties one weight into four modules: `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head`.
    accelerate's FSDP2 preparation puts the input and output embeddings in one `fully_shard` group and leaves the
    two stacks' `embed_tokens` to the root group, and torch >= 2.13 refuses a parameter seen by two groups
    ("Parameter 'base_model.model.shared.weight' is shared with a parameter already managed by another FSDP
    group"). With one module in all three places, the root group skips it as already sharded. Nothing happens
    without FSDP2.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2 or not hasattr(model, "get_input_embeddings"):
        return
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return
    model.set_input_embeddings(embedding)  # T5: also the encoder's and decoder's embed_tokens
    output = model.get_output_embeddings()
    others = [
        name
        for name, module in model.named_modules()
        if module not in (embedding, output) and any(p is weight for p in module.parameters(recurse=False))
    ]
    if others:
        raise ValueError(
            f"FSDP2 cannot shard a weight held by several modules: the input embedding's weight is also held by "
            f"{', '.join(others)}. Make those modules the input embedding module itself (as T5's "
            "`set_input_embeddings` does), or untie the weights."
        )


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
    fsdp_version = requested_fsdp_version(training_args)
    state = getattr(training_args, "distributed_state", None)
    on_cpu = state is not None and state.distributed_type == DistributedType.MULTI_CPU
    if fsdp_version is not None and on_cpu and not (fsdp_version == 2 and _CPU_FSDP2_ALLOWED):
        fix = (
            "FSDP1 shards only across GPUs and other accelerators; use FSDP2 (`--fsdp_version 2` or `fsdp_version: 2` "
            "in the accelerate config) to shard CPU processes."
            if fsdp_version != 2
            else "This script did not call `hf_condroute.integrations.distributed.allow_fsdp2_on_cpu()`, which lets "
            "accelerate shard CPU processes."
        )
        warnings.warn(
            f"FSDP was asked for (version {fsdp_version}), but accelerate set up {state.distributed_type}: training "
            f"runs with plain data parallelism instead. {fix}",
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
    different statistics, and the statistics would only ever see rank 0's examples. FSDP does not shard buffers
    and never syncs them, so each process would keep its own.
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


def end_distributed() -> None:
    """Wait for every process, then tear the process group down, before the interpreter exits. Left to interpreter
    shutdown, gloo's worker threads can be destroyed while another process still talks to them, and a run that
    succeeded aborts with "terminate called without an active exception" (exit -6), seen under DeepSpeed on CPU."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
