"""Routed LoRA experts: PEFT LoRA fidelity, the sum of routed low-rank updates against a plain reference, every
router, generation with the KV cache, saving, disabling, gradient checkpointing and a router shared by a layer's
targets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file

import hf_condroute
from hf_condroute import ROUTERS, RoutedLoraConfig
from hf_condroute.routers import router_class
from hf_condroute.tuners.routed_lora.sharing import SharedRouter

from .conftest import bert_batch, llama_batch, make_bert, make_llama, top_k_for
from .routed_lora_helpers import PEFT_ROUNDING, layers, peft_lora, routed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def copy_lora(routed_model, lora_model, expert: int = 0) -> None:
    for name, module in lora_model.named_modules():
        if isinstance(module, PeftLoraLinear):
            bank = routed_model.get_submodule(name).bank("default")
            bank.load_expert(expert, module.lora_A["default"].weight, module.lora_B["default"].weight)


def tags_kwargs(router: str, batch: int) -> dict:
    return {"routing_tags": torch.arange(batch) % 4} if router_class(router).needs_tags else {}


def run_fresh(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


# ----- fidelity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("lora_alpha", [16, 8, 4])
def test_one_expert_with_weight_one_equals_peft_lora_up_to_fp32_rounding(family, lora_alpha):
    make, batch, task = {"llama": (make_llama, llama_batch, "CAUSAL_LM"), "bert": (make_bert, bert_batch, "SEQ_CLS")}[
        family
    ]
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["query", "value", "output.dense"]
    lora = peft_lora(make(), r=8, lora_alpha=lora_alpha, target_modules=targets).eval()
    model = routed(make(), num_experts=1, router="top_k", r=8, lora_alpha=lora_alpha, target_modules=targets).eval()
    copy_lora(model, lora)
    data = batch()
    with torch.no_grad():
        expected = lora(**data).logits
        got = model(**data).logits
    # top_k over one expert: weight softmax([z]) = 1 exactly; alpha / r a power of two (2, 1, 0.5) scales the r hidden
    # units here and the output in PEFT, which rounds the same: the arithmetic is PEFT's, up to the GEMMs' summation
    # order (other shapes, see PEFT_ROUNDING)
    torch.testing.assert_close(got, expected, **PEFT_ROUNDING)
    decision = next(iter(hf_condroute.get_routing(model).values()))
    real = decision.experts >= 0  # padding tokens have no expert
    assert real.any() and torch.equal(decision.weights[real], torch.ones_like(decision.weights[real]))


def test_scaling_that_is_not_a_power_of_two_differs_from_peft_by_rounding_only():
    targets = ["q_proj", "v_proj"]
    lora = peft_lora(make_llama(), r=8, lora_alpha=12, target_modules=targets).eval()
    model = routed(make_llama(), num_experts=1, r=8, lora_alpha=12, target_modules=targets).eval()
    copy_lora(model, lora)
    with torch.no_grad():
        # 1.5 scales the rank-8 hidden units here, the output in PEFT: one rounding apart
        torch.testing.assert_close(model(**llama_batch()).logits, lora(**llama_batch()).logits, **PEFT_ROUNDING)


def test_two_experts_forward_and_backward_match_a_plain_reference():
    model = routed(
        make_llama(), router="top_k", top_k=2, r=4, lora_alpha=12, init_lora_weights=False, target_modules=["down_proj"]
    )
    layer = layers(model)["base_model.model.model.layers.0.mlp.down_proj"]
    block = layer.routed_lora_block["default"]
    bank = block.experts
    model.eval()
    torch.manual_seed(3)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    upstream = torch.randn_like(out)
    params = [x, bank.lora_A, bank.lora_B, *block.router.parameters()]
    grads = torch.autograd.grad((out * upstream).sum(), params)

    rows = x.reshape(-1, x.shape[-1])
    decision = block.router(rows)
    assert decision.experts.shape == (15, 2)
    ref = layer.base_layer(rows)
    for j in range(2):
        e = decision.experts[:, j]
        delta = torch.bmm(torch.bmm(rows.unsqueeze(1), bank.lora_A[e]), bank.lora_B[e]).squeeze(1)
        ref = ref + (12 / 4) * decision.weights[:, j : j + 1] * delta
    ref = ref.reshape(out.shape)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


# ----- routers, defaults, targets --------------------------------------------------------------------
@pytest.mark.parametrize("sharing", [None, "layer"], ids=["own", "shared"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_trains_a_causal_lm(router, sharing):
    model = routed(
        make_llama(),
        router=router,
        top_k=top_k_for(router),
        init_lora_weights=False,
        router_sharing=sharing,
        target_modules=LLAMA_MLP,
        router_aux_loss_coef=0.01,
    )
    model.train()
    batch = llama_batch()
    out = model(**batch, **tags_kwargs(router, 4))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(g.abs().sum() for n, g in grads.items() if "experts.lora_A" in n) > 0
    router_grad = sum(g.abs().sum() for n, g in grads.items() if ".router." in n)
    assert (router_grad > 0) == router_class(router).learned
    routing = hf_condroute.get_routing(model)
    assert len(routing) == 6
    decision = routing["model.layers.0.mlp.up_proj"]
    if router_class(router).per_example_only:  # smear: per example whatever the model
        assert decision.experts.dim() == 2 and decision.experts.shape[0] == 4
    else:
        assert decision.experts.shape[:2] == (4, 7)  # per token: a causal LM's default
    if sharing:
        assert torch.equal(decision.experts, routing["model.layers.0.mlp.gate_proj"].experts)
    model.eval()
    with torch.no_grad():
        logits = model(**batch, **tags_kwargs(router, 4)).logits
    assert torch.isfinite(logits).all()


def test_granularity_defaults_to_token_for_causal_lms_and_is_saved(tmp_path):
    llama = routed(make_llama())
    bert = routed(make_bert(), task_type="SEQ_CLS")
    assert llama.peft_config["default"].routing_granularity == "token"
    assert bert.peft_config["default"].routing_granularity == "example"
    llama.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).routing_granularity == "token"
    # PEFT LoRA's default targets
    assert {n.rsplit(".", 1)[-1] for n in layers(llama)} == {"q_proj", "v_proj"}
    assert {n.rsplit(".", 1)[-1] for n in layers(bert)} == {"query", "value"}


def test_all_linear_targets_every_linear_but_the_output_head():
    model = routed(make_llama(), target_modules="all-linear")
    names = {n.split("model.layers.0.", 1)[-1] for n in layers(model) if ".layers.0." in n}
    assert names == {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        f"mlp.{p}" for p in LLAMA_MLP
    }
    assert len(layers(model)) == 14 and not any("lm_head" in n or ".router." in n for n in layers(model))


def test_untrained_experts_change_nothing_and_disable_adapter_is_the_base():
    base = make_llama()
    batch = llama_batch()
    with torch.no_grad():
        expected = base(**batch).logits
    model = routed(base, target_modules="all-linear").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)  # B starts at zero
    trained = routed(make_llama(), init_lora_weights=False, top_k=2, target_modules="all-linear").eval()
    with torch.no_grad():
        assert not torch.allclose(trained(**batch).logits, expected)
        with trained.disable_adapter():
            torch.testing.assert_close(trained(**batch).logits, expected, rtol=0, atol=0)
        unloaded = trained.unload()
        assert not layers(unloaded)
        torch.testing.assert_close(unloaded(**batch).logits, expected, rtol=0, atol=0)


def test_init_lora_weights_follows_peft():
    from hf_condroute import LoraBank

    torch.manual_seed(0)
    for init in (True, "gaussian", False):
        bank = LoraBank(3, 64, 32, r=4, lora_alpha=8, init_lora_weights=init)
        assert bank.lora_A.abs().max() > 0
        assert (bank.lora_B.abs().max() > 0) == (init is False)
    assert LoraBank(3, 64, 32, r=4, lora_alpha=8).lora_A.abs().max() <= 1 / 64**0.5  # nn.Linear's kaiming bound
    assert LoraBank(1, 64, 32, r=4, lora_alpha=8).scaling == 2.0


def test_merging_is_refused_with_a_clear_message():
    model = routed(make_llama())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    per_example = routed(make_bert(), routing_granularity="example", target_modules=["query"])
    with pytest.raises(ValueError, match="each example's, when routed per example"):
        per_example.merge_and_unload()


# ----- router sharing --------------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["layer", r"layers\.\d+\.mlp"])
def test_a_shared_router_routes_once_per_layer(sharing):
    model = routed(
        make_llama(),
        router="top_k",
        top_k=2,
        router_sharing=sharing,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj", *LLAMA_MLP],
    )
    found = layers(model)
    owners = {n for n, m in found.items() if not isinstance(m.routed_lora_block["default"].router, SharedRouter)}
    if sharing == "layer":  # q_proj runs first in each layer and routes for all five targets
        assert owners == {f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in range(2)}
    else:  # the MLP routes on its input (gate_proj's), the attention projections keep their own routers
        assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in owners} == {
            "self_attn.q_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
        }
    router_keys = [k for k in model.state_dict() if ".router." in k]
    assert all(any(o in k for o in owners) for k in router_keys)  # followers save no router
    model.train()
    calls = []
    for name in owners:
        found[name].routed_lora_block["default"].router.register_forward_hook(lambda *a: calls.append(1))
    model(**llama_batch()).loss.backward()
    assert len(calls) == len(owners)  # one router call per group and forward
    routing = hf_condroute.get_routing(model)
    for i in range(2):
        mlp = [routing[f"model.layers.{i}.mlp.{p}"].experts for p in LLAMA_MLP]
        assert all(torch.equal(e, mlp[0]) for e in mlp)


# ----- generation, saving, checkpointing --------------------------------------------------------------
def test_a_mask_changed_in_place_between_forwards_is_read_again():
    # whether a mask is all ones is checked once per mask, not in every block: an in-place change must count
    model = routed(make_llama(), init_lora_weights=False, target_modules="all-linear").eval()
    ids = llama_batch(batch=2)["input_ids"]
    mask = torch.ones_like(ids)
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert bool((hf_condroute.get_routing(model)[name].experts >= 0).all())
        mask[1, :3] = 0
        in_place = model(input_ids=ids, attention_mask=mask).logits
        routed_tokens = (hf_condroute.get_routing(model)[name].experts >= 0).all(-1)
        assert torch.equal(routed_tokens, mask.bool())  # padding gets no expert
        fresh = model(input_ids=ids, attention_mask=mask.clone()).logits
    assert torch.equal(in_place, fresh)


@pytest.mark.parametrize("router", ["top_k", "hash"])
def test_generation_with_the_kv_cache_equals_a_no_cache_recomputation(router):
    model = routed(
        make_llama(),
        router=router,
        top_k=2 if router == "top_k" else 1,
        init_lora_weights=False,
        lora_alpha=32,
        router_sharing="layer",
        target_modules="all-linear",
    ).eval()
    batch = llama_batch(batch=3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(**inputs, **kw)
    last = hf_condroute.get_routing(model)["model.layers.0.mlp.down_proj"]
    assert last.experts.shape[1] == 1  # with the cache, each step routes only its new token
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    with model.disable_adapter():
        base_tokens = model.generate(**inputs, **kw)
    assert not torch.equal(cached, base_tokens)  # the experts do change what is generated


def test_save_and_load_in_a_fresh_process_is_exact(tmp_path):
    model = routed(
        make_llama(),
        router="top_k",
        top_k=2,
        init_lora_weights=False,
        router_sharing="layer",
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in range(2):  # moves experts and the routers' BatchNorm statistics
        model(**llama_batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    model_keys = {
        k.replace(".routed_lora_block.default.", ".routed_lora_block.")
        for k in model.state_dict()
        if "routed_lora_block" in k
    }
    assert set(saved) == model_keys
    model.eval()
    batch = llama_batch(seed=5)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({"batch": batch, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, hf_condroute
        from peft import PeftModel
        from tests.conftest import make_llama
        torch.set_num_threads({torch.get_num_threads()})
        data = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(make_llama(), {str(tmp_path / "adapter")!r}).eval()
        assert isinstance(model.peft_config["default"], hf_condroute.RoutedLoraConfig)
        with torch.no_grad():
            got = model(**data["batch"]).logits
        torch.testing.assert_close(got, data["expected"], rtol=0, atol=0)
        print("EXACT")
        """
    )
    result = run_fresh(script)
    assert "EXACT" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("router, sharing", [("top_k", None), ("reinforce", None), ("top_k", "layer")])
def test_gradient_checkpointing_gives_the_same_gradients(router, sharing):
    grads = []
    for reentrant in (None, False, True):
        base = make_llama()
        if reentrant is not None:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = routed(
            base,
            router=router,
            top_k=2,
            init_lora_weights=False,
            router_sharing=sharing,
            router_z_loss_coef=0.1,
            target_modules="all-linear",
            lora_dropout=0.1,
            task_type="CAUSAL_LM",
        )
        model.train()
        torch.manual_seed(7)
        model(**llama_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert set(other) == set(grads[0])
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be >= 1"),
        (dict(lora_alpha=0), "lora_alpha must be > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be one of True, False, 'gaussian'"),
        (dict(router_sharing="("), "router_sharing must be 'layer' or a valid regular expression"),
        (dict(lora_experts=[]), "lora_experts is empty"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutedLoraConfig(**kwargs)


@pytest.mark.parametrize("granularity", ["example", "token"])
def test_t5_cross_attention_keys_and_values_route_on_the_encoders_tokens(granularity):
    from .conftest import make_t5, t5_batch

    model = routed(make_t5(), init_lora_weights=False, routing_granularity=granularity, task_type="SEQ_2_SEQ_LM")
    sides = {n.removeprefix("base_model.model."): m.side for n, m in layers(model).items()}
    assert sides["decoder.block.0.layer.1.EncDecAttention.v"] == "encoder"  # its input is the encoder's output
    assert sides["decoder.block.0.layer.1.EncDecAttention.q"] == "decoder"
    batch = t5_batch()
    batch["decoder_attention_mask"] = torch.ones(4, 5, dtype=torch.long)  # 5 target tokens, 7 source tokens
    batch["decoder_attention_mask"][0, 4:] = 0
    model.train()
    model(**batch).loss.backward()
    decision = hf_condroute.get_routing(model)["decoder.block.0.layer.1.EncDecAttention.v"]
    if granularity == "token":
        assert decision.experts.shape[:2] == (4, 7)
        assert (decision.experts[0, 5:] == -1).all()  # the encoder's padding
    model.eval()
    out = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3, num_beams=2
    )
    assert out.shape[0] == 4
