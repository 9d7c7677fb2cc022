"""Runs recipes/glue.py under `accelerate launch` (DDP, or DeepSpeed with a config file) and saves each process's
trainable parameters and buffers afterwards, so a test can check that no process drifted from the others."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

if __name__ == "__main__":
    from recipe_loader import load_recipe  # run as a script, so tests/ is on sys.path

    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if use_deepspeed:
        from hf_condroute.integrations.deepspeed import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()  # gloo, not a 3-minute build of DeepSpeed's shared-memory op
    recipe = load_recipe("glue")
    args, training_args = recipe.parse_arguments(sys.argv[1:])
    trainer, _ = recipe.train_and_evaluate(args, training_args)
    model = trainer.model
    if use_deepspeed:  # ZeRO-3 leaves each process a slice of each parameter: gather them (on every process)
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if "routed_adapter" in n})
    torch.save(state, os.path.join(training_args.output_dir, f"rank{training_args.process_index}_state.pt"))
    from hf_condroute.integrations.distributed import end_distributed

    end_distributed()
