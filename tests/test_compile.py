"""torch.compile: routed models trace into one graph (no graph break), train compiled with the same numbers as eager,
do not recompile beyond one compilation per new shape, and train with the stock Trainer's `torch_compile=True`.

These tests trace with dynamo and mostly run the captured graphs with the `eager`/`aot_eager` backends: they check
what torch.compile captures (graph breaks, guards, AOTAutograd's forward and backward) in seconds, where inductor's
code generation takes minutes on 2 cores (inductor is run by benchmarks/compile.py).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_condroute import AdapterBank, RoutedAdapterConfig, RoutedBlock, RoutedFFNConfig, RoutedLoraConfig, RoutingInputs
from hf_condroute.routers import ROUTERS, build_router, router_class
from hf_condroute.routers.config import RoutingConfig

from .conftest import VOCAB, llama_batch, make_llama

pytestmark = [
    pytest.mark.compile,
    pytest.mark.filterwarnings("ignore:.*is a causal language model"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]

TUNERS = {
    ("lora", "token"): lambda **kw: RoutedLoraConfig(num_experts=4, r=4, init_lora_weights=False, **kw),
    ("lora", "example"): lambda **kw: RoutedLoraConfig(
        num_experts=4, r=4, init_lora_weights=False, routing_granularity="example", **kw
    ),
    ("adapter", "token"): lambda **kw: RoutedAdapterConfig(
        num_experts=4, adapter_dim=4, init_weights=False, routing_granularity="token", task_type="CAUSAL_LM", **kw
    ),
    ("adapter", "example"): lambda **kw: RoutedAdapterConfig(
        num_experts=4, adapter_dim=4, init_weights=False, routing_granularity="example", task_type="CAUSAL_LM", **kw
    ),
    ("ffn", "token"): lambda **kw: RoutedFFNConfig(num_experts=4, init_weights=False, task_type="CAUSAL_LM", **kw),
}


def routed_llama(tuner=("adapter", "token"), **kw):
    kw.setdefault("top_k", 2)
    return get_peft_model(make_llama(num_hidden_layers=1), TUNERS[tuner](**kw))


def unpadded(batch: dict) -> dict:
    return {**batch, "attention_mask": torch.ones_like(batch["attention_mask"]), "labels": batch["input_ids"]}


@pytest.mark.parametrize("tuner", sorted(TUNERS), ids="-".join)
def test_routed_models_trace_without_graph_breaks(tuner):
    """Padded batches (per-token rows of fixed shape), training (auxiliary losses, BatchNorm statistics) and
    evaluation: one graph each. Before issue 27 these were 30 to 44 breaks per forward."""
    model = routed_llama(tuner, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    batch = llama_batch()  # left padding
    for training in (True, False):
        model.train(training)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda **kw: model(**kw).loss)(**batch)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        assert explained.graph_count == 1


# the auxiliary losses each router is checked with (the padded test adds tag supervision), so that every mean is
LOSS_COEFS = {
    "top_k": dict(router_aux_loss_coef=0.01, router_z_loss_coef=0.001, trimmed_lasso_coef=0.01),
    "expert_choice": dict(router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
    "st_gumbel": dict(router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
    "dselect_k": dict(router_aux_loss_coef=0.01, trimmed_lasso_coef=0.01),
    "comet": dict(router_aux_loss_coef=0.01, trimmed_lasso_coef=0.01),
}


def compiled_and_eager_step(router: str, batch: dict, backend: str = "aot_eager", tuner=("adapter", "token"), **config):
    """(loss, logits, gradients, router buffers) of one training step, eager and compiled with fullgraph=True, from
    the same weights and random seed."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        kw = {"router": router, "top_k": 1 if router == "hash" else 2, **LOSS_COEFS.get(router, {}), **config}
        model = routed_llama(tuner, **kw).train()
        step = lambda model=model, **b: model(**b)  # noqa: E731
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, backend=backend, fullgraph=True)
        torch.manual_seed(1)
        out = step(**batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers() if ".router." in n}
        results.append((out.loss.detach(), out.logits.detach(), grads, buffers))
    return results


# one router per mechanism the traced path changes: BatchNorm warm-up and auxiliary losses (top_k), a random router
# with its tensor temperature (st_gumbel), the reward and baseline losses (reinforce), a decision of data-dependent
# width (expert_choice), hash keys (hash); the whole list would take minutes on 2 cores
@pytest.mark.parametrize("router", ["top_k", "st_gumbel", "reinforce", "expert_choice", "hash"])
def test_compiled_training_step_equals_eager(router):
    (loss, _, grads, _), (c_loss, _, c_grads, _) = compiled_and_eager_step(router, unpadded(llama_batch()))
    # the same float32 ops in another order (AOTAutograd's decompositions, the traced BatchNorm): fp32 rounding
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


# deterministic routers of every mechanism a padded batch changes: BatchNorm statistics and the shared auxiliary
# losses (top_k, with tag supervision on part of the batch), Expert Choice's picks among the real rows, hash keys, the
# smooth-step gates whose losses take their own means (dselect_k, comet)
@pytest.mark.parametrize("router", ["top_k", "expert_choice", "hash", "dselect_k", "comet"])
def test_compiled_padded_training_step_equals_eager(router):
    """Under compilation a padded batch's padding tokens stay rows (fixed shapes): the router's BatchNorm statistics
    and every auxiliary loss's mean are taken over the real rows, as eager's, which drops the padding."""
    batch = {**llama_batch(), "routing_tags": torch.tensor([0, -100, 2, 3])}  # example 1 is padded
    supervised = {"tag_supervision_coef": 0.1} if router_class(router).learned else {}
    eager, compiled = compiled_and_eager_step(router, batch, **supervised)
    (loss, logits, grads, buffers), (c_loss, c_logits, c_grads, c_buffers) = eager, compiled
    # the same float32 ops in another order (masked sums for BatchNorm and the means, AOTAutograd): fp32 rounding
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(c_logits[real], logits[real], rtol=1e-5, atol=1e-5)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert c_buffers.keys() == buffers.keys()
    for name in buffers:  # running mean, unbiased running variance, batch count
        torch.testing.assert_close(c_buffers[name], buffers[name], rtol=1e-5, atol=1e-6, msg=name)


# the random routers: their samples are drawn for every position of a padded per-token batch, eager and traced alike
@pytest.mark.parametrize("router", ["st_gumbel", "reinforce", "moesart", "v_moe", "smoe"])
def test_compiled_padded_training_of_random_routers_equals_eager(router):
    """Random routers see every position of a padded batch in eager mode too (the padding rows' draws are thrown
    away), so with the same seed the compiled step draws the same samples: loss, logits, gradients and the BatchNorm
    statistics are eager's."""
    eager, compiled = compiled_and_eager_step(router, llama_batch())
    (loss, logits, grads, buffers), (c_loss, c_logits, c_grads, c_buffers) = eager, compiled
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    real = llama_batch()["attention_mask"].bool()
    torch.testing.assert_close(c_logits[real], logits[real], rtol=1e-5, atol=1e-5)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert [n for n in buffers if "running" in n]
    for name in buffers:
        torch.testing.assert_close(c_buffers[name], buffers[name], rtol=1e-5, atol=1e-6, msg=name)


LEARNED = [name for name in ROUTERS if router_class(name).learned]


@pytest.mark.parametrize("name", LEARNED)
def test_traced_loss_terms_on_padded_rows_equal_eager_on_real_rows(name):
    """Every learned router's auxiliary losses (its own terms included: REINFORCE's policy, value and entropy,
    DSelect-k's and COMET's), traced with padding rows among the real ones, equal eager's on the real rows alone, in
    value and gradient (padding rows get none)."""
    torch.manual_seed(0)
    coefs = dict(router_aux_loss_coef=0.01, trimmed_lasso_coef=0.01, tag_supervision_coef=0.1)
    if router_class(name).softmax_logits:
        coefs["router_z_loss_coef"] = 0.001
    config = RoutingConfig(router=name, num_experts=4, top_k=2, **coefs)
    router = build_router(config, 8).train()
    valid = torch.tensor([True, False, True, True, False, False, True, True, True, False])
    decision = router(torch.randn(valid.shape[0], 8))
    logits = decision.logits.detach()
    baseline = None if decision.baseline is None else decision.baseline.detach().requires_grad_()
    experts = decision.experts.masked_fill(~valid.unsqueeze(1), -1)  # as the block leaves padding rows
    targets = torch.tensor([0, 1, -100, 3, 2, 0, 1, -100, 2, 3])
    reward = torch.randn(valid.shape[0])

    def total(logits, baseline, experts, targets, reward, valid=None):
        terms = router.loss_terms(logits, experts, baseline, targets, reward, valid)
        return sum(terms.values())

    def value_and_grads(fn, rows, **extra):
        leaf = logits[rows].clone().requires_grad_()
        base = None if baseline is None else baseline.detach()[rows].clone().requires_grad_()
        value = fn(leaf, base, experts[rows], targets[rows], reward[rows], **extra)
        leaves = [leaf] if base is None else [leaf, base]
        return value.detach(), torch.autograd.grad(value, leaves)

    eager, eager_grads = value_and_grads(total, valid)
    torch._dynamo.reset()
    traced = torch.compile(total, backend="aot_eager", fullgraph=True)
    every = torch.ones_like(valid)
    compiled, compiled_grads = value_and_grads(traced, every, valid=valid)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)  # masked sums against means: fp32 rounding
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c[valid], e, rtol=1e-5, atol=1e-7)
        assert not c[~valid].any()


def test_compiled_padded_evaluation_equals_eager():
    """Padding tokens are routed to no expert under compilation: the logits of a padded batch are the eager ones."""
    model = routed_llama(("lora", "token")).eval()
    batch = llama_batch()
    with torch.no_grad():
        eager = model(**batch).logits
        torch._dynamo.reset()
        compiled = torch.compile(lambda **b: model(**b).logits, backend="aot_eager", fullgraph=True)(**batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled[mask], eager[mask], rtol=1e-5, atol=1e-6)


def test_training_recompiles_once_per_new_shape():
    """Step ids, record keys and per-block state are not guards: 20 steps compile once, and new batch shapes
    recompile at most once each (the second shape makes the dimension dynamic)."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    model = routed_llama(("lora", "token"), router_aux_loss_coef=0.01).train()
    step = torch.compile(lambda **b: model(**b).loss, backend=counting_backend, fullgraph=True)
    torch._dynamo.reset()
    for _ in range(20):
        step(**unpadded(llama_batch())).backward()
    assert len(compiles) == 1
    for batch_size in (2, 3, 5):
        step(**unpadded(llama_batch(batch_size))).backward()
    assert len(compiles) <= 1 + 3


def test_trainer_torch_compile_trains_evaluates_saves_and_loads_eagerly(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        ids = torch.randint(2, VOCAB, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": ids})
    data = Dataset.from_list(rows)
    model = routed_llama(("lora", "token"), router_aux_loss_coef=0.01)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        torch_compile=True,
        torch_compile_backend="aot_eager",  # inductor's code generation would take minutes here; same capture
    )
    torch._dynamo.reset()
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=default_data_collator
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.save_model(str(tmp_path / "saved"))

    loaded = PeftModel.from_pretrained(make_llama(num_hidden_layers=1), str(tmp_path / "saved")).eval()
    model.eval()
    batch = {k: torch.tensor([r[k] for r in rows[:4]]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_a_custom_router_without_valid_is_refused_clearly_on_padded_compiled_batches():
    """A router written before `valid` cannot be told which rows of a traced padded batch are real: a clear error
    naming the fix, not a TypeError from deep in the trace. Eager never passes `valid`, so it still routes there."""

    class OldTopK(router_class("top_k")):
        def forward(self, x, tags=None, keys=None, step=None):
            return self.select(self.compute_logits(x), x)

    config = RoutingConfig(router="top_k", num_experts=4, top_k=2)
    block = RoutedBlock(OldTopK(8, 4, config), AdapterBank(4, 8, 3, init_weights=False), "token", name="blk")
    x, mask = torch.randn(2, 5, 8), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert block(x, RoutingInputs(mask=mask)).shape == x.shape
    torch._dynamo.reset()
    traced = torch.compile(lambda x, mask: block(x, RoutingInputs(mask=mask)), backend="eager", fullgraph=True)
    # fullgraph: dynamo reports the ValueError raised while tracing as Unsupported, with its message
    with pytest.raises(torch._dynamo.exc.Unsupported, match="has no `valid` argument.*Add `valid=None`"):
        traced(x, mask)


@pytest.mark.parametrize("tuner", sorted(TUNERS), ids="-".join)
def test_compiled_generation_gives_eager_tokens_and_compiles_once_per_phase(tuner):
    """`model.compile(fullgraph=True)` of the base model and `generate` with the static cache, from a left-padded
    batch: the greedy tokens are eager's; prefill and decoding compile once each (the routing hook and the forward
    are separate frames), and generating again from a prompt of the same shape compiles nothing."""
    torch.manual_seed(0)
    model = routed_llama(tuner).eval()
    batch = llama_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, do_sample=False, pad_token_id=0, cache_implementation="static")

    eager = generate()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.get_base_model().compile(fullgraph=True, backend=counting_backend)
    try:
        # exact: integer tokens, in one process, from the same aten ops (the counting backend runs dynamo's graph
        # with eager kernels), so no other rounding can flip a greedy choice
        assert torch.equal(generate(), eager)
        first = len(compiles)
        assert first <= 2 * 3  # (pre-hook, forward, post-hook) x (prefill, decoding)
        assert torch.equal(generate(), eager)
        assert len(compiles) == first
    finally:
        torch._dynamo.reset()
