"""Every ```python block of the README runs as written, on tiny local models.

Each block runs in a fresh namespace holding only the stand-ins the README names around it (`t5`, `batch`, `tags`,
`model`, `dataloader`, `args`, `ds`, `path`, `trainer`, `llama`, `another_llama`, `lora_a`, `lora_b`), so a missing
import or a wrong argument fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from hf_condroute import RoutedAdapterConfig

from .conftest import bert_batch, make_bert, make_llama, make_t5, t5_batch

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def stand_ins(tmp_path: Path) -> dict:
    """What the README says each name stands for, as tiny random models and data."""
    batch = t5_batch()
    bert = make_bert().train()
    rows = [{k: v[i] for k, v in bert_batch(8, seed=s).items()} for s in range(2) for i in range(8)]
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=True,
    )
    path = tmp_path / "t5"
    make_t5().save_pretrained(path)
    routed = get_peft_model(make_bert(), RoutedAdapterConfig(num_experts=2, adapter_dim=4, task_type="SEQ_CLS"))
    loras = []
    for seed, name in enumerate(("lora_a", "lora_b")):  # two PEFT LoRAs of one base, LoRA's default targets
        lora = get_peft_model(make_llama(), LoraConfig(r=8, init_lora_weights=False), adapter_name="default")
        torch.manual_seed(seed)
        lora.save_pretrained(tmp_path / name)
        loras.append(str(tmp_path / name))
    return {
        "llama": make_llama(),
        "another_llama": make_llama(),
        "lora_a": loras[0],
        "lora_b": loras[1],
        "t5": make_t5().train(),
        "batch": batch,
        "tags": torch.tensor([0, 1, 2, 3]),
        "model": bert,
        "dataloader": [bert_batch(4, seed=s) for s in range(2)],
        "args": args,
        "ds": ds,
        "path": str(path),
        "trainer": Trainer(model=routed, args=args, train_dataset=ds),
    }


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 4
    assert any("RoutedAdapterConfig(" in s for s in SNIPPETS) and any("RoutedFFNConfig(" in s for s in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: SNIPPETS[i].splitlines()[0][:40])
def test_a_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    if "BitsAndBytesConfig" in code:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    namespace = stand_ins(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
