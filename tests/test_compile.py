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

from hf_condroute import RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig

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


def compiled_and_eager_step(router: str, batch: dict, backend: str = "aot_eager", tuner=("adapter", "token")):
    """(loss, gradients) of one training step, eager and compiled with fullgraph=True, from the same weights and
    random seed."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        kw = {"router": router, "top_k": 1 if router == "hash" else 2}
        if router in ("top_k", "expert_choice", "st_gumbel"):
            kw.update(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
        model = routed_llama(tuner, **kw).train()
        step = lambda model=model, **b: model(**b).loss  # noqa: E731
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, backend=backend, fullgraph=True)
        torch.manual_seed(1)
        loss = step(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    return results


# one router per mechanism the traced path changes: BatchNorm warm-up and auxiliary losses (top_k), a random router
# with its tensor temperature (st_gumbel), the reward and baseline losses (reinforce), a decision of data-dependent
# width (expert_choice), hash keys (hash); the whole list would take minutes on 2 cores
@pytest.mark.parametrize("router", ["top_k", "st_gumbel", "reinforce", "expert_choice", "hash"])
def test_compiled_training_step_equals_eager(router):
    (loss, grads), (c_loss, c_grads) = compiled_and_eager_step(router, unpadded(llama_batch()))
    # the same float32 ops in another order (AOTAutograd's decompositions, the traced BatchNorm): fp32 rounding
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


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
