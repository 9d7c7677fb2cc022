"""Runs recipes/glue.py under `accelerate launch` (DDP or FSDP2) and records, on every process, how the parameters
and optimizer states were laid out after the first step (DTensor placements, local and global shapes) and the
routers' buffers at the end, so a test can check that FSDP really sharded and that no process drifted."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback


def layout(tensor) -> dict:
    if isinstance(tensor, DTensor):
        return {"placements": [str(p) for p in tensor.placements], "local": list(tensor.to_local().shape),
                "global": list(tensor.shape)}  # fmt: skip
    return {"placements": None, "local": list(tensor.shape), "global": list(tensor.shape)}


class RecordLayout(TrainerCallback):
    """After the first optimizer step (parameters sharded again after backward): each parameter's layout, and
    that of its Adam state."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        params = {name: {**layout(p), "trainable": p.requires_grad} for name, p in model.named_parameters()}
        names = {p: name for name, p in model.named_parameters()}
        states = getattr(optimizer, "optimizer", optimizer).state  # the Trainer's is accelerate's wrapper
        adam = {names[p]: layout(s["exp_avg"]) for p, s in states.items() if "exp_avg" in s}
        with open(self.path, "w") as f:
            json.dump({"parameters": params, "exp_avg": adam}, f)


if __name__ == "__main__":
    from recipe_loader import load_recipe  # run as a script, so tests/ is on sys.path

    recipe = load_recipe("glue")
    args, training_args = recipe.parse_arguments(sys.argv[1:])
    rank = training_args.process_index
    Trainer = recipe.GlueSeq2SeqTrainer

    class ProbeTrainer(Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(RecordLayout(os.path.join(training_args.output_dir, f"rank{rank}_layout.json")))

    recipe.GlueSeq2SeqTrainer = ProbeTrainer
    trainer, _ = recipe.train_and_evaluate(args, training_args)
    buffers = {n: b.detach().clone() for n, b in trainer.model.named_buffers() if "routed_adapter" in n}
    torch.save(buffers, os.path.join(training_args.output_dir, f"rank{rank}_buffers.pt"))
