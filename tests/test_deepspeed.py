"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo, `DS_ACCELERATOR=cpu`): the three routed tuners train with
`deepspeed.initialize` and with the stock Trainer, while each rank leaves experts unused, and end where one process
taking the same steps ends; under ZeRO-3 no save writes an incomplete adapter. One launch runs every case
(tests/deepspeed_probe.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from .conftest import make_bert
from .launch_helpers import run_launch

if importlib.util.find_spec("deepspeed") is None:  # found, not imported: the tests' processes import it
    pytest.skip("DeepSpeed is optional: pip install 'hf-condroute[deepspeed]'", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ENGINE_CASES = ("adapter_tag", "lora_hash", "ffn_top_k")
TRAINER_CASES = tuple(f"trainer_{case}" for case in ENGINE_CASES)


def torchrun_env() -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "deepspeed_probe.py"), str(out)]  # fmt: skip
    # the shared-memory op is not built (skip_cpu_shm_comm_build), so this takes seconds, not minutes
    done = run_launch(cmd, torchrun_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "deepspeed_shm_comm" not in done.stdout + done.stderr
    with open(out / "saves.json") as f:
        saves = json.load(f)
    return out, torch.load(out / "params.pt"), saves


def assert_same(got: dict, want: dict, exact: bool) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if exact:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
        else:
            # ZeRO-3 takes its own gradient path (bucketed reduce-scatter into flat partitions): float32 rounding
            # (seen: 5e-10 on weights of 0.09 after 3 steps); a missing expert gradient or a wrong average moves
            # weights by about the learning rate times a gradient, 1e-4 and more
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-8, msg=key)


@pytest.mark.parametrize("case", ENGINE_CASES + TRAINER_CASES)
def test_zero_ends_where_one_process_ends(probe, case):
    _, params, _ = probe
    one = params[f"{case}/one"]
    # ZeRO-2: the same kernels on each micro-batch, and gradients averaged over 2 processes exactly
    assert_same(params[f"{case}/zero2"], one, exact=True)
    assert_same(params[f"{case}/zero3"], one, exact=False)


def test_experts_no_rank_routes_to_stay_and_the_others_train(probe):
    _, params, _ = probe
    init, one = params["adapter_tag/init"], params["adapter_tag/one"]
    banks = [k for k in init if k.endswith("experts.up_weight")]
    assert len(banks) == 4  # 2 BERT layers, after attention and after the FFN
    for key in banks:
        # tags send rank 0's examples to experts 0 and 1, rank 1's to expert 2, nothing to expert 3
        assert torch.equal(one[key][3], init[key][3]), key
        assert all(not torch.equal(one[key][e], init[key][e]) for e in (0, 1, 2)), key


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_zero3_save_refuses_an_incomplete_adapter(probe, case):
    _, _, saves = probe
    outcome = saves[f"{case}/zero3"]
    # save_pretrained on rank 0 alone, as most scripts save: refused, nothing written (no empty adapter, no card)
    assert outcome["plain"].startswith("refused: Not saving routed adapter 'default', which would be incomplete")
    assert "partitioned by DeepSpeed ZeRO-3" in outcome["plain"]
    assert "stage3_gather_16bit_weights_on_model_save" in outcome["plain"]
    assert "deepspeed.zero.GatheredParameters" in outcome["plain"]
    assert outcome["plain_files"] == []
    assert "the `state_dict` passed lacks" in outcome["empty_state_dict"]
    assert outcome["empty_state_dict_files"] == []


@pytest.mark.parametrize("case", ENGINE_CASES + TRAINER_CASES)
def test_zero3_saves_load_complete_in_one_process(probe, case):
    out, params, saves = probe
    if case in TRAINER_CASES:
        folders = {"save_model": out / f"{case}_zero3"}
    else:  # a consolidated state dict passed in, and save_pretrained inside GatheredParameters on every process
        assert saves[f"{case}/zero3"]["consolidated"] == saves[f"{case}/zero3"]["gathered"] == "saved"
        folders = {kind: out / f"{case}_zero3" / kind for kind in ("consolidated", "gathered")}
    for folder in folders.values():
        assert {"adapter_model.safetensors", "routing_stats.json", "README.md"} <= set(os.listdir(folder))
        model = PeftModel.from_pretrained(make_bert(seed=3), str(folder))
        loaded = {n: p for n, p in model.named_parameters() if "default" in n}
        want = params[f"{case}/zero3"]
        assert loaded.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(loaded[key], want[key], rtol=0, atol=0, msg=key)
