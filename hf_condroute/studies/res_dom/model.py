"""Res-Dom's model: a narrowed ResNet-18 (transformers' `ResNetForImageClassification`), pretrained once on the
disjoint pretraining split and cached, then frozen with routed conv adapters on its 8 residual blocks.

`BackboneSettings` is ResNet-18's shape (basic blocks, depths 2-2-2-2: 8 residual blocks) with widths
16-32-64-128 instead of 64-128-256-512, so a CPU trains it in seconds. The backbone is pretrained (all weights,
AdamW, stock `Trainer`) on the pretraining split (a third of the digit images, never in the study's train or
test split, real domain only: the role ImageNet plays for DomainNet) and saved with `save_pretrained` under
`cache_dir/<hash of the settings>`, so later runs load it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from peft import get_peft_model
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_condroute import RoutedAdapterConfig

from .data import ResDomData

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hf_condroute", "res_dom")
MEAN, STD = 0.5, 0.25  # pixels in [0, 1] -> roughly zero mean, unit scale


@dataclass(frozen=True)
class BackboneSettings:
    hidden_sizes: tuple[int, ...] = (16, 32, 64, 128)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    embedding_size: int = 16
    pretrain_steps: int = 400
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    seed: int = 0

    def resnet_config(self, num_labels: int) -> ResNetConfig:
        return ResNetConfig(
            embedding_size=self.embedding_size, hidden_sizes=list(self.hidden_sizes), depths=list(self.depths),
            layer_type="basic", num_labels=num_labels,
        )  # fmt: skip

    def key(self, data: ResDomData) -> str:
        """A hash of these settings and the pretraining images: a cached backbone is reused only for both."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(data.pixel_values.numpy().tobytes())
        h.update(data.labels.numpy().tobytes())
        return h.hexdigest()[:16]


class ResDomDataset(torch.utils.data.Dataset):
    """The Trainer's view of `ResDomData`: pixel_values (normalised), labels, routing_tags (the domain, or -100
    where `tags` hides it) and routing_keys (hash routing's fixed key per image)."""

    def __init__(self, data: ResDomData, tags: torch.Tensor | None = None):
        self.data = data
        self.tags = data.domains if tags is None else tags

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": (self.data.pixel_values[i] - MEAN) / STD,
            "labels": self.data.labels[i],
            "routing_tags": self.tags[i],
            "routing_keys": self.data.ids[i],
        }


class _PixelsOnly(ResDomDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {"pixel_values": item["pixel_values"], "labels": item["labels"]}


def training_arguments(
    output_dir: str, steps: int, batch_size: int, lr: float, seed: int, **extra
) -> TrainingArguments:
    """The stock Trainer's arguments shared by pretraining and the study: AdamW, warm-up then linear decay, CPU,
    no checkpoints, no logging integrations."""
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.0, seed=seed, data_seed=seed,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, **extra,
    )  # fmt: skip


def pretrain_backbone(data: ResDomData, settings: BackboneSettings) -> ResNetForImageClassification:
    torch.manual_seed(settings.seed)
    model = ResNetForImageClassification(settings.resnet_config(len(data.class_names)))
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, settings.pretrain_steps, settings.pretrain_batch_size, settings.pretrain_lr,
                                  settings.seed)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=_PixelsOnly(data))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return model.eval()


def load_or_pretrain_backbone(
    data: ResDomData, settings: BackboneSettings, cache_dir: str | None = DEFAULT_CACHE
) -> tuple[str, bool]:
    """The folder of the pretrained backbone for these settings and pretraining data, and whether it was trained
    now (False: found in the cache). cache_dir=None trains it into a fresh temporary folder."""
    root = cache_dir if cache_dir is not None else tempfile.mkdtemp(prefix="res_dom_backbone_")
    path = os.path.join(root, settings.key(data))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, False
    model = pretrain_backbone(data, settings)
    os.makedirs(root, exist_ok=True)
    partial = tempfile.mkdtemp(dir=root)
    model.save_pretrained(partial)
    os.replace(partial, path) if not os.path.exists(path) else None  # another process may have finished first
    return path, True


def load_backbone(path: str, num_labels: int) -> ResNetForImageClassification:
    """A pretrained ResNet (a local folder or a Hub id) with a classifier for `num_labels` classes (re-initialised
    when the pretrained head has another size)."""
    return ResNetForImageClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True)


@dataclass(frozen=True)
class AdapterSettings:
    """Routed conv adapters: 6 experts (one per domain) of 1x1-conv bottlenecks of `adapter_dim` on every residual
    block's output, routed per example on the block output's spatial mean by paper A's router (BatchNorm + Linear
    + softmax); the classifier head is trained too."""

    num_experts: int = 6
    adapter_dim: int = 8
    extra: dict = field(default_factory=dict)  # RoutedAdapterConfig fields of the row (router settings)


def routed_model(backbone_path: str, num_labels: int, router: str, settings: AdapterSettings, seed: int):
    torch.manual_seed(seed)
    base = load_backbone(backbone_path, num_labels)
    config = RoutedAdapterConfig(
        num_experts=settings.num_experts, adapter_dim=settings.adapter_dim, router=router, target_modules=None,
        modules_to_save=["classifier"], **settings.extra,
    )  # fmt: skip
    return get_peft_model(base, config)
