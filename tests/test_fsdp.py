"""recipes/glue.py with FSDP2 on 2 CPU processes (gloo): the routed adapters, routers and the frozen base are
really sharded, a few steps end where the DDP run ends, and the saved adapter loads like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from hf_condroute.integrations.distributed import check_process_count, share_tied_embedding_module

from .conftest import make_t5
from .glue_fixtures import save_tiny_glue, save_tiny_t5

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "glue_fsdp_probe.py"
LAUNCHERS = {"ddp": ["--multi_gpu"], "fsdp": ["--use_fsdp", "--fsdp_version", "2"]}


def launch(mode: str, argv: list[str], timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[mode], "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(PROBE), *argv, "--use_cpu"]  # fmt: skip
    # PYTHONPATH: the processes import this checkout's hf_condroute, whatever the environment has installed
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3 steps of REINFORCE routing with tag supervision (routers, baselines and BatchNorm statistics all
    train) under DDP and under FSDP2."""
    base = tmp_path_factory.mktemp("fsdp")
    data_dir = save_tiny_glue(str(base / "glue"), train_rows=8, eval_rows=3)
    model_dir = save_tiny_t5(str(base / "t5"))
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = base / mode
        launch(mode, [
            "--model_name_or_path", model_dir, "--data_dir", data_dir, "--output_dir", str(out[mode]),
            "--routing", "reinforce", "--tag_supervision_fraction", "0.5", "--tasks", "cola", "rte",
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--warmup_steps", "0", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--seed", "7",
        ])  # fmt: skip
    return model_dir, out


def read_layout(output_dir, rank: int) -> dict:
    with open(os.path.join(output_dir, f"rank{rank}_layout.json")) as f:
        return json.load(f)


def test_fsdp_shards_every_parameter_and_optimizer_state(runs):
    _, out = runs
    for rank in (0, 1):
        layout = read_layout(out["fsdp"], rank)
        params = layout["parameters"]
        experts = {n: p for n, p in params.items() if n.endswith("experts.up_weight")}
        routers = {n: p for n, p in params.items() if n.endswith("router.network.proj.weight")}
        assert len(experts) == len(routers) == 8  # 2 + 2 T5 layers, after attention and after the FFN
        for name, p in params.items():
            # every parameter, trainable or frozen, is a DTensor sharded along dim 0 over the 2 processes
            assert p["placements"] == ["S(0)"], name
            rows = p["global"][0]
            assert p["local"] == [rows - rows // 2 if rank == 0 else rows // 2, *p["global"][1:]], name
        # stacked experts (N=8, in, out): each process holds 4 experts
        assert all(p["global"][0] == 8 and p["local"][0] == 4 for p in experts.values())
        assert any(not p["trainable"] for p in params.values())
        # Adam's state lives beside each trainable shard
        trainable = {n for n, p in params.items() if p["trainable"]}
        assert set(layout["exp_avg"]) == trainable
        assert all(layout["exp_avg"][n]["local"] == params[n]["local"] for n in trainable)
    # under DDP nothing is sharded
    assert all(p["placements"] is None for p in read_layout(out["ddp"], 0)["parameters"].values())


def test_fsdp_ends_where_ddp_ends(runs):
    _, out = runs
    ddp = load_file(os.path.join(out["ddp"], "adapter_model.safetensors"))
    fsdp = load_file(os.path.join(out["fsdp"], "adapter_model.safetensors"))
    assert fsdp.keys() == ddp.keys()
    assert any(k.endswith("experts.up_weight") for k in fsdp) and any("router.baseline" in k for k in fsdp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5, msg=key)
    # routers' BatchNorm statistics: averaged over the processes after each step, the same on both and as DDP's
    buffers = [torch.load(os.path.join(out["fsdp"], f"rank{rank}_buffers.pt")) for rank in (0, 1)]
    ddp_buffers = torch.load(os.path.join(out["ddp"], "rank0_buffers.pt"))
    assert any(k.endswith("running_mean") for k in buffers[0])
    for key in ddp_buffers:
        torch.testing.assert_close(buffers[1][key], buffers[0][key], atol=0, rtol=0, msg=key)
        torch.testing.assert_close(buffers[0][key], ddp_buffers[key], atol=1e-6, rtol=1e-5, msg=key)


def test_the_sharded_run_saves_an_adapter_that_loads_in_one_process(runs):
    model_dir, out = runs
    assert {"adapter_config.json", "routing_stats.json", "all_results.json"} <= set(os.listdir(out["fsdp"]))
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), str(out["fsdp"]))
    loaded = get_peft_model_state_dict(model)
    ddp = load_file(os.path.join(out["ddp"], "adapter_model.safetensors"))
    assert loaded.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(loaded[key], ddp[key], atol=1e-6, rtol=1e-5, msg=key)
    with open(os.path.join(out["fsdp"], "all_results.json")) as f:
        assert json.load(f)["routing_setup"]["processes"] == 2


class _Args:
    world_size = 2
    fsdp_plugin_args = None

    def __init__(self, distributed_type):
        self.distributed_state = type("State", (), {"distributed_type": distributed_type})()


def test_fsdp_requests_that_still_fall_back_to_ddp_warn(monkeypatch, recwarn):
    import hf_condroute.integrations.distributed as distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.warns(UserWarning, match=r"FSDP was asked for \(version 1\).*use FSDP2 \(`--fsdp_version 2`"):
        check_process_count(_Args(DistributedType.MULTI_CPU))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(distributed, "_CPU_FSDP2_ALLOWED", False)
    with pytest.warns(UserWarning, match=r"did not call `hf_condroute.integrations.distributed.allow_fsdp2_on_cpu"):
        check_process_count(_Args(DistributedType.MULTI_CPU))
    recwarn.clear()
    monkeypatch.setattr(distributed, "_CPU_FSDP2_ALLOWED", True)
    check_process_count(_Args(DistributedType.MULTI_CPU))  # accelerate will shard these CPU processes
    check_process_count(_Args(DistributedType.MULTI_GPU))  # accelerate turns GPU processes into FSDP itself
    assert not [w for w in recwarn if "FSDP" in str(w.message)]


def _fsdp2_accelerator():
    plugin = type("Plugin", (), {"fsdp_version": 2})()
    return type("Accelerator", (), {"state": type("State", (), {"fsdp_plugin": plugin})()})()


def test_t5_embedding_becomes_one_module_for_fsdp2():
    model = make_t5()
    assert model.encoder.embed_tokens is not model.shared
    share_tied_embedding_module(model, _fsdp2_accelerator())
    assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
    assert model.lm_head.weight is model.shared.weight

    model = make_t5()
    model.extra = torch.nn.Embedding(1, 1)
    model.extra.weight = model.shared.weight
    with pytest.raises(ValueError, match="also held by extra. Make those modules the input embedding module"):
        share_tied_embedding_module(model, _fsdp2_accelerator())
