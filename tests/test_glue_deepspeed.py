"""recipes/glue.py under `accelerate launch --use_deepspeed --deepspeed_config_file ...` (ZeRO-3) on 2 CPU processes:
it trains, evaluates and saves a complete adapter that ends where one process ends, the same on both processes."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from .glue_fixtures import save_tiny_glue, save_tiny_t5
from .test_glue_recipe import (
    EVAL_ROWS,
    PROBE,
    SOME_TASKS,
    assert_ranks_in_sync,
    check_results,
    flags,
    launch,
    read_results,
    recipe,
)

if importlib.util.find_spec("deepspeed") is None:  # found, not imported: the tests' processes import it
    pytest.skip("DeepSpeed is optional: pip install 'hf-condroute[deepspeed]'", allow_module_level=True)

# what a user's file holds; "auto" values come from the Trainer's arguments. Threshold 0: every parameter is
# partitioned, however small (ZeRO-3 keeps those under 1e5 elements whole, which is all of this tiny T5)
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_zero3_launch_matches_one_process(tmp_path, monkeypatch):
    assets = (
        save_tiny_glue(str(tmp_path / "glue"), train_rows=8, eval_rows=EVAL_ROWS),
        save_tiny_t5(str(tmp_path / "t5")),
    )
    one, two = tmp_path / "one", tmp_path / "zero3"
    recipe.main(flags(assets, one, "tag", 3, 4, eval_batch=8))
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    # the probe skips DeepSpeed's shared-memory op (skip_cpu_shm_comm_build): gloo, no 3-minute build
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    launch(PROBE, flags(assets, two, "tag", 3, 2, eval_batch=4),
           launcher=("--use_deepspeed", "--deepspeed_config_file", str(config)))  # fmt: skip
    results = read_results(two)
    check_results(results, "tag", SOME_TASKS)
    assert results["routing_setup"]["processes"] == 2
    want = load_file(os.path.join(one, "adapter_model.safetensors"))
    got = load_file(os.path.join(two, "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].numel() > 0, key
        # as for DDP (tests/test_glue_recipe.py): rounding between the launched and the in-process run, which Adam
        # scales up on near-zero gradients; a wrong average or a missing expert gradient moves weights by about 1e-2
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=1e-3, msg=key)
    assert_ranks_in_sync(two)
