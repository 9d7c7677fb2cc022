"""Runs recipes/glue.py under `accelerate launch` and saves each process's trainable parameters and buffers
afterwards, so a test can check that no process drifted from the others."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "glue.py"


def load_recipe():
    if "glue_recipe" in sys.modules:
        return sys.modules["glue_recipe"]
    spec = importlib.util.spec_from_file_location("glue_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["glue_recipe"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    recipe = load_recipe()
    args, training_args = recipe.parse_arguments(sys.argv[1:])
    trainer, _ = recipe.train_and_evaluate(args, training_args)
    model = trainer.model
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if "routed_adapter" in n})
    torch.save(state, os.path.join(training_args.output_dir, f"rank{training_args.process_index}_state.pt"))
