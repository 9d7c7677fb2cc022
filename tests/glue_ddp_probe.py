"""Runs recipes/glue.py under `accelerate launch` and saves each process's trainable parameters and buffers
afterwards, so a test can check that no process drifted from the others."""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__":
    from recipe_loader import load_recipe  # run as a script, so tests/ is on sys.path

    recipe = load_recipe("glue")
    args, training_args = recipe.parse_arguments(sys.argv[1:])
    trainer, _ = recipe.train_and_evaluate(args, training_args)
    model = trainer.model
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if "routed_adapter" in n})
    torch.save(state, os.path.join(training_args.output_dir, f"rank{training_args.process_index}_state.pt"))
