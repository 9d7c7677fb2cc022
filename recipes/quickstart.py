"""Routed adapters on a tiny T5 in a minute on a CPU, with nothing downloaded.

A randomly initialised T5 learns two synthetic tasks (copy the input; reverse it) with 2 routed adapters per
block, through the stock `transformers.Trainer`. The dataset carries a `routing_tags` column (the task), which
the Trainer keeps and the routers see. It prints how each router sends the two tasks to the experts.

    python recipes/quickstart.py                  # tag routing and top-k routing, 60 steps each
    python recipes/quickstart.py --routers hash reinforce --steps 100
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import T5Config, T5ForConditionalGeneration, Trainer, TrainingArguments

import hf_condroute
from hf_condroute import RoutedAdapterConfig

PAD, EOS, VOCAB = 0, 1, 32


def synthetic_tasks(n: int, seed: int = 0) -> Dataset:
    """Task 0 copies a random sequence, task 1 reverses it; the task id is the routing tag."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        task = i % 2
        seq = torch.randint(2, VOCAB, (6,), generator=g).tolist()
        target = seq if task == 0 else seq[::-1]
        rows.append({"input_ids": [task + 2] + seq + [EOS], "labels": target + [EOS], "routing_tags": task})
    return Dataset.from_list(rows)


def collate(features: list[dict]) -> dict:
    """Pad token ids with PAD (labels with -100); the routing tags become a (batch,) LongTensor."""
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([torch.tensor(f["input_ids"]) for f in features], batch_first=True, padding_value=PAD)
    labels = pad([torch.tensor(f["labels"]) for f in features], batch_first=True, padding_value=-100)
    tags = torch.tensor([f["routing_tags"] for f in features])
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels, "routing_tags": tags}


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


def train(router: str, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    top_k = 2 if router == "moesart" else 1
    model = get_peft_model(
        tiny_t5(), RoutedAdapterConfig(num_experts=2, adapter_dim=16, router=router, top_k=top_k, task_type="SEQ_2_SEQ_LM")
    )
    train_set, eval_set = synthetic_tasks(512, seed), synthetic_tasks(64, seed + 1)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
            logging_steps=max(1, steps // 3), report_to=[], save_strategy="no", seed=seed, disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate)
        trainer.train()
        model.eval()
        batch = collate([eval_set[i] for i in range(len(eval_set))])
        with torch.no_grad():
            loss = model(**batch).loss.item()
    routing = hf_condroute.get_routing(model)
    tags = batch["routing_tags"]
    share = {}
    for name, decision in list(routing.items())[:2]:
        chosen = decision.experts[:, 0]
        share[name] = [[round(float((chosen[tags == t] == e).float().mean()), 2) for e in range(2)] for t in range(2)]
    return {"router": router, "eval_loss": round(loss, 3), "expert_share_by_task": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=["tag", "top_k"], choices=list(hf_condroute.ROUTERS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for router in args.routers:
        result = train(router, args.steps, args.seed)
        print(f"\n{router}: eval loss {result['eval_loss']}")
        for name, share in result["expert_share_by_task"].items():
            print(f"  {name}: share of task 0 / task 1 sent to expert 0, 1 = {share}")


if __name__ == "__main__":
    main()
