"""Catching launches that start a different number of training processes than the user asked for.

Two launches look fine and are not:
- `accelerate launch --cpu --num_processes N` (accelerate 1.x) starts one process: it runs several CPU processes
  only through mpirun (`--mpirun_hostfile`). It still sets MASTER_ADDR, which is how the request shows.
- `torchrun`/`accelerate launch --multi_gpu` on a machine without GPUs starts N processes, but transformers
  only joins them for DDP with `--use_cpu`: otherwise each trains alone on all the data and they overwrite
  each other's output.
"""

from __future__ import annotations

import os

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
    if started > 1 and training_args.world_size != started:
        raise RuntimeError(
            f"{started} processes were started, but transformers runs them as {training_args.world_size} training "
            f"process(es) (no GPU found and --use_cpu not given), so each would train alone on all the data. "
            f"{CPU_LAUNCH_HINT}"
        )
