"""Routed adapters on a tiny T5 in about a minute on a CPU (63 s on 2 idle cores, --threads 2), nothing downloaded.

A randomly initialised tiny T5 (frozen, as a PEFT base) learns two tasks on the same kind of input, a sequence
of 6 symbols: `max` (answer its largest symbol) and `min` (its smallest). Only the routed adapters (2 experts per
block) and their routers train, through the stock
`transformers.Trainer`; the dataset's `routing_tags` column (the task) is what tag routing routes by and what
Focus/Cover are measured against. For each router it prints the accuracy per task and which task goes to which
expert in every block, then saves one routed model with its model card and routing heatmaps.

    python recipes/quickstart.py                              # tag, hash, top_k, moesart (and smear, once it exists)
    python recipes/quickstart.py --routers top_k reinforce --steps 400 --save_router top_k
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings

# bitsandbytes, when installed, logs a notice about an optional CPU kernel the moment PEFT imports it
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import ProgressCallback  # noqa: E402

import hf_condroute  # noqa: E402
from hf_condroute import RoutedAdapterConfig  # noqa: E402
from hf_condroute.stats.metrics import routing_focus_cover  # noqa: E402
from hf_condroute.studies.cli import at_least, run_recipe  # noqa: E402

PAD, EOS, FIRST_SYMBOL, SYMBOLS, LENGTH = 0, 1, 8, 16, 6
TASKS = ["max", "min"]
NUM_EXPERTS = len(TASKS)
DEFAULT_ROUTERS = ["tag", "hash", "top_k", "moesart", "smear"]
CLEAR_SHARE = 0.75  # a block "sends" a task to an expert when that expert takes this share of its examples


def synthetic_tasks(n: int, seed: int) -> Dataset:
    """n examples, the tasks in turn: input [task token] + 6 symbols + EOS, target [answer, EOS]."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + SYMBOLS, (n, LENGTH), generator=g)
    task = torch.arange(n) % len(TASKS)
    answers = torch.stack([seq.max(1).values, seq.min(1).values], 1)
    answer = answers[torch.arange(n), task]
    input_ids = torch.cat([2 + task[:, None], seq, torch.full((n, 1), EOS)], 1)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "labels": torch.stack([answer, torch.full_like(answer, EOS)], 1).tolist(),
            "routing_tags": task.tolist(),
        }
    )


def collate(features: list[dict]) -> dict:
    """Every example has the same length, so batching is stacking; the tags become a (batch,) LongTensor."""
    input_ids = torch.tensor([f["input_ids"] for f in features])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor([f["labels"] for f in features]),
        "routing_tags": torch.tensor([f["routing_tags"] for f in features]),
    }


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=FIRST_SYMBOL + SYMBOLS,
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(config)


class BarOnly(ProgressCallback):
    """The Trainer's progress bar without the dicts of logged numbers printed through it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train(router: str, steps: int, seed: int, train_set: Dataset, out_dir: str):
    torch.manual_seed(seed)
    cfg = RoutedAdapterConfig(
        num_experts=NUM_EXPERTS,
        adapter_dim=32,
        router=router,
        top_k=2 if router == "moesart" else 1,
        task_type="SEQ_2_SEQ_LM",
    )
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` while wrapping the model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(tiny_t5(), cfg)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        warmup_steps=10,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarOnly)
    print(f"\n== {router} ==")
    trainer.train()
    return model


@torch.no_grad()
def evaluate(model, eval_set: Dataset) -> dict:
    """Accuracy per task (the answer token under greedy decoding, i.e. the argmax of the first output position) and
    the routing of every block for the same examples."""
    model.eval()
    batch = {k: v.to(model.device) for k, v in collate(list(eval_set)).items()}
    logits = model(**batch).logits
    tags = batch["routing_tags"].cpu()
    correct = (logits[:, 0].argmax(-1) == batch["labels"][:, 0]).cpu()
    answers = batch["labels"][:, 0].cpu()
    accuracy, chance = {}, {}
    for t, task in enumerate(TASKS):
        accuracy[task] = float(correct[tags == t].float().mean())
        chance[task] = float(torch.bincount(answers[tags == t]).max()) / int((tags == t).sum())  # most common answer
    routing = {k: d for k, d in hf_condroute.get_routing(model).items()}
    focus, cover, _ = routing_focus_cover(routing, tags)
    return {"accuracy": accuracy, "chance": chance, "routing": routing, "tags": tags, "focus": focus, "cover": cover}


def short(block: str) -> str:
    """'base_model.model.encoder.block.1.layer.0.SelfAttention.o' -> 'enc1.attn'."""
    parts = block.split(".")
    stack = "enc" if "encoder" in parts else "dec"
    layer = parts[parts.index("block") + 1]
    kind = "attn" if "SelfAttention" in parts else "ffn"
    return f"{stack}{layer}.{kind}"


def routing_table(result: dict) -> tuple[list[str], list[str]]:
    """Lines of a table (tasks x blocks: the expert taking most of the task there, and its share), and a sentence
    per task saying it in words."""
    tags, blocks = result["tags"], list(result["routing"].items())
    header = f"  {'task':<9}" + "".join(f"{short(name):>11}" for name, _ in blocks)
    lines, words = [header], []
    for t, task in enumerate(TASKS):
        cells, main = [], []
        for _, decision in blocks:
            experts, weights = decision.experts[tags == t], decision.weights[tags == t]
            first = experts.gather(1, weights.argmax(1, keepdim=True))[:, 0]  # each example's highest-weight expert
            counts = torch.bincount(first.clamp(min=0), minlength=NUM_EXPERTS)
            expert = int(counts.argmax())
            share = float(counts[expert]) / len(first)
            cells.append(f"e{expert} {share:4.0%}")
            main.append((expert, share))
        lines.append(f"  {task:<9}" + "".join(f"{c:>11}" for c in cells))
        modal = max(range(NUM_EXPERTS), key=lambda e: sum(1 for x, s in main if x == e and s >= CLEAR_SHARE))
        held = sum(1 for x, s in main if x == modal and s >= CLEAR_SHARE)
        words.append(
            f"{task} to expert {modal} in {held} of {len(blocks)} blocks" if held else f"{task} to no one expert"
        )
    return lines, words


def report(router: str, result: dict, seconds: float) -> None:
    acc = ", ".join(f"{t} {result['accuracy'][t]:.0%} (chance {result['chance'][t]:.0%})" for t in TASKS)
    print(f"{router}: accuracy {acc}; trained in {seconds:.0f} s")
    lines, words = routing_table(result)
    print("  expert taking most of each task's examples in each block (enc/dec layer, after attention / FFN):")
    print("\n".join(lines))
    print(f"  Focus {result['focus']:.2f}, Cover {result['cover']:.2f}")
    print(f"  {router} sends " + "; ".join(words) + f" (at least {CLEAR_SHARE:.0%} of the task's examples).")


def save(model, router: str, eval_set: Dataset, folder: str) -> None:
    loader = torch.utils.data.DataLoader(eval_set, batch_size=128, collate_fn=collate)
    hf_condroute.compute_routing_stats(model, loader, tag_names=TASKS)  # what the card and heatmaps show
    model.save_pretrained(folder)
    files = sorted(f for f in os.listdir(folder) if f.endswith((".md", ".png", ".json")))
    print(f"\nSaved the {router} model in {os.path.abspath(folder)}: {', '.join(files)}")
    print(f"Look at its routing with:  python -m hf_condroute.report {folder}")


def learned_the_tasks(result: dict) -> bool:
    """Far above chance on both tasks: at least halfway from chance to every answer right."""
    return all(result["accuracy"][t] >= (1 + result["chance"][t]) / 2 for t in TASKS)


def closing_paragraph(results: dict, steps: int) -> str:
    """What to look for, said from the numbers of this run (a short run's routers may not have learned yet)."""
    learned = [r for r in results if learned_the_tasks(results[r])]
    if len(learned) == len(results):
        said = ["Every router learns both tasks far above chance."]
    elif learned:
        late = [r for r in results if r not in learned]
        said = [
            f"{', '.join(learned)} learn both tasks far above chance; {', '.join(late)} not yet after {steps} steps "
            "(train longer, e.g. --steps 600, the default)."
        ]
    else:
        said = [
            f"No router has learned the tasks after {steps} steps (accuracy near chance): train longer, e.g. "
            "--steps 600 (the default). The routing below is that of barely trained routers."
        ]
    fc = {r: f"{results[r]['focus']:.2f}/{results[r]['cover']:.2f}" for r in results}
    if "tag" in results:
        said.append(f"Tag routing sends each task to its own expert by construction (Focus/Cover {fc['tag']}).")
    if "hash" in results:
        said.append(f"Hash routing ignores the task (Focus/Cover {fc['hash']}; near 1/2 means no separation).")
    trained = [r for r in results if hf_condroute.routers.router_class(r).learned]
    if trained:
        apart = [r for r in trained if min(results[r]["focus"], results[r]["cover"]) >= 0.9]
        partly = [r for r in trained if r not in apart]
        said.append("Learned routers' Focus/Cover: " + ", ".join(f"{r} {fc[r]}" for r in trained) + ".")
        if partly:
            said.append(
                f"{', '.join(partly)} find the tasks only in part: with tasks this easy every expert can serve both, "
                "so nothing forces them apart (paper A's point)."
            )
        if apart:
            said.append(f"{', '.join(apart)} separate the tasks (Focus and Cover at least 0.9) in this run.")
    return "What to look for: " + " ".join(said)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--routers",
        nargs="+",
        default=[r for r in DEFAULT_ROUTERS if r in hf_condroute.ROUTERS],
        choices=list(hf_condroute.ROUTERS),
    )
    parser.add_argument("--steps", type=at_least(1), default=600, help="training steps per router (batch 32)")
    parser.add_argument("--seed", type=at_least(0), default=0)
    # 1 by default: 2 threads on a 2-core machine busy with other work wait on each other at every small op (19 min
    # against 1 thread's 2 min there); a second thread only pays on idle cores (63 s on 2 idle cores)
    parser.add_argument(
        "--threads", type=at_least(1), default=1, help="torch threads (default 1; 2 is faster only on idle cores)"
    )
    parser.add_argument("--save_router", default=None, help="the router whose model is saved (default: top_k)")
    parser.add_argument("--output_dir", default="quickstart_model")
    args = parser.parse_args(argv)
    save_router = args.save_router or ("top_k" if "top_k" in args.routers else args.routers[-1])
    if save_router not in args.routers:
        parser.error(f"--save_router {save_router} is not among --routers {' '.join(args.routers)}: add it there.")
    torch.set_num_threads(args.threads)
    train_set, eval_set = synthetic_tasks(args.steps * 32, args.seed), synthetic_tasks(480, args.seed + 1)
    print(
        f"Tasks {', '.join(TASKS)} on sequences of {LENGTH} symbols; {NUM_EXPERTS} experts per block; "
        f"{args.steps} steps per router."
    )
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for router in args.routers:
            start = time.perf_counter()
            model = train(router, args.steps, args.seed, train_set, scratch)
            seconds = time.perf_counter() - start
            results[router] = evaluate(model, eval_set)
            report(router, results[router], seconds)
            if router == save_router:
                kept = model
    save(kept, save_router, eval_set, args.output_dir)
    print("\n" + closing_paragraph(results, args.steps))


if __name__ == "__main__":
    run_recipe(main)
