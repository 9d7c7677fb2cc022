"""Half-precision base models: every router of the three tuners on bf16 and fp16 T5, BERT and Llama, with PEFT's
`autocast_adapter_dtype` on and off. The router computes in float32 and keeps float32 statistics, the experts
follow `autocast_adapter_dtype` (float32, or the base dtype), and each block returns its base layer's dtype."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

import hf_condroute
from hf_condroute import ROUTERS, RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig
from hf_condroute.block.routed_block import ROUTER_KEY

from .conftest import bert_batch, llama_batch, make_bert, make_llama, make_t5, t5_batch, top_k_for

FAMILIES = {"t5": (make_t5, t5_batch), "bert": (make_bert, bert_batch), "llama": (make_llama, llama_batch)}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
TUNERS = {"adapter": "routed_adapter_block", "ffn": "routed_ffn_block", "lora": "routed_lora_block"}


def routed_config(tuner: str, family: str, router: str):
    common = dict(num_experts=4, router=router, top_k=top_k_for(router))
    per_example_only = hf_condroute.routers.router_class(router).per_example_only
    if tuner == "adapter":
        # a causal LM routes per token; the encoder models per example
        granularity = "token" if family == "llama" and not per_example_only else "example"
        return RoutedAdapterConfig(adapter_dim=8, routing_granularity=granularity, **common)
    if per_example_only:
        common["routing_granularity"] = "example"
    if tuner == "lora":  # per token for the causal LM by default; B random, so the experts change the output
        return RoutedLoraConfig(r=4, init_lora_weights=False, **common)
    return RoutedFFNConfig(init_weights=False, **common)  # experts from the FFN's neurons in index order


def half_model(tuner, family, dtype, autocast, router):
    make, _ = FAMILIES[family]
    return get_peft_model(make().to(dtype), routed_config(tuner, family, router), autocast_adapter_dtype=autocast)


def check_dtypes(model, tuner: str, base_dtype: torch.dtype, autocast: bool) -> None:
    expert_dtype = torch.float32 if autocast else base_dtype
    seen = {"router": 0, "experts": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if TUNERS[tuner] not in name or not t.is_floating_point():
            continue
        part = "router" if ROUTER_KEY in name else "experts"
        want = torch.float32 if part == "router" else expert_dtype
        assert t.dtype == want, f"{name} is {t.dtype}, expected {want}"
        seen[part] += 1
    assert seen["experts"] > 0
    return seen


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "base_dtype"])
@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_every_router_trains_and_evaluates_on_a_half_precision_base(tuner, family, dtype, autocast, router):
    base_dtype = HALF[dtype]
    model = half_model(tuner, family, base_dtype, autocast, router)
    seen = check_dtypes(model, tuner, base_dtype, autocast)
    if hf_condroute.routers.router_class(router).learned:
        assert seen["router"] > 0
    batch = FAMILIES[family][1]()
    tags = torch.arange(batch["input_ids"].shape[0]) % 4
    model.train()
    out = model(**batch, routing_tags=tags)
    assert out.logits.dtype == base_dtype  # every block hands its base layer's dtype on
    assert torch.isfinite(out.loss)
    out.loss.float().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert any(g is not None for _, g in grads)
    for name, grad in grads:
        assert grad is None or torch.isfinite(grad).all(), name
    for decision in hf_condroute.get_routing(model).values():
        assert decision.probs.dtype == torch.float32 and decision.weights.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        logits = model(**batch, routing_tags=tags).logits
    assert logits.dtype == base_dtype and torch.isfinite(logits).all()
    check_dtypes(model, tuner, base_dtype, autocast)  # a training step changed no dtype (BatchNorm statistics)


def test_casting_the_whole_model_keeps_the_router_float32_and_exact():
    model = get_peft_model(make_t5(), routed_config("adapter", "t5", "top_k"))
    before = {n: t.clone() for n, t in model.state_dict().items() if ROUTER_KEY in n and t.is_floating_point()}
    model.to(torch.bfloat16)  # what `bf16_full_eval` and users do
    after = model.state_dict()
    assert before
    for name, value in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], value), name
    expert = next(t for n, t in after.items() if "routed_adapter_block" in n and ROUTER_KEY not in n)
    assert expert.dtype == torch.bfloat16
    model.float()
    assert all(torch.equal(model.state_dict()[n], v) for n, v in before.items())
    model.double()  # an explicit float64 cast still applies (gradient checks)
    assert all(model.state_dict()[n].dtype == torch.float64 for n in before)


@pytest.mark.parametrize("router", [r for r in ROUTERS if hf_condroute.routers.router_class(r).learned])
def test_router_computes_in_float32_under_autocast(router):
    from hf_condroute.routers import build_router

    torch.manual_seed(0)
    r = build_router(routed_config("adapter", "bert", router), 16).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        plain = r(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = r(x)
    assert mixed.logits.dtype == torch.float32
    torch.testing.assert_close(mixed.logits, plain.logits, rtol=0, atol=0)  # bf16 matmuls would differ


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "base_dtype"])
def test_bf16_save_and_load_in_a_fresh_process_is_exact(tmp_path, tuner, autocast):
    model = half_model(tuner, "bert", torch.bfloat16, autocast, "top_k")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for seed in range(3):  # moves the experts and the routers' BatchNorm statistics
        model(**bert_batch(seed=seed)).loss.float().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    batch = bert_batch(seed=7)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"batch": batch, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, hf_condroute
        from peft import PeftModel
        from tests.conftest import make_bert
        torch.set_num_threads({torch.get_num_threads()})
        data = torch.load({str(tmp_path / "expected.pt")!r})
        base = make_bert().to(torch.bfloat16)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}, autocast_adapter_dtype={autocast}).eval()
        with torch.no_grad():
            got = model(**data["batch"]).logits
        assert got.dtype == torch.bfloat16, got.dtype
        torch.testing.assert_close(got, data["expected"], rtol=0, atol=0)
        print("EXACT")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env, timeout=300
    )
    assert "EXACT" in result.stdout, result.stderr[-3000:]
