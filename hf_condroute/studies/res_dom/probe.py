"""How well a ResNet reads the domain from the image (paper A 4.4 measured 85% on DomainNet): the pretrained
backbone, all weights trained on the training split's domains with the stock Trainer, scored on the test split.
Anything below 100% means tag routing is not exactly recoverable from the input."""

from __future__ import annotations

import tempfile

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from .data import ResDomData
from .model import ResDomDataset, load_backbone, training_arguments


class _DomainLabels(ResDomDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {"pixel_values": item["pixel_values"], "labels": self.data.domains[i]}


@torch.no_grad()
def _accuracy(model, data: ResDomData, batch_size: int = 512) -> float:
    model.eval()
    dataset = _DomainLabels(data)
    hits = 0
    for start in range(0, len(data), batch_size):
        batch = torch.utils.data.default_collate([dataset[i] for i in range(start, min(start + batch_size, len(data)))])
        hits += int((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
    return 100 * hits / len(data)


def domain_accuracy(
    backbone: str,
    train: ResDomData,
    test: ResDomData,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Test accuracy (%) of predicting the domain."""
    torch.manual_seed(seed)
    model = load_backbone(backbone, len(train.domain_names))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=training_arguments(tmp, steps, batch_size, lr, seed),
                          train_dataset=_DomainLabels(train))  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return _accuracy(model, test)
