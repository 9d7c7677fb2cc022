"""DomainNet (or any multi-domain image classification data) as `ResDomData`: an image folder laid out
`domain/class/*.jpg`, or a `datasets` data set (a Hub id or a `save_to_disk` folder) with image, label and domain
columns. Images are converted to RGB and resized to `image_size` x `image_size`; pixels in [0, 1]."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .data import ResDomData

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _pixels(images: Sequence, image_size: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for image in images:
        image = image if isinstance(image, Image.Image) else Image.open(image)
        array = np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BILINEAR), dtype=np.float32)
        out.append(torch.from_numpy(array / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def load_image_folder(root: str, image_size: int = 32) -> ResDomData:
    """root/domain/class/*.jpg: domains are the sorted top folders, classes the sorted union of their subfolders
    (a class missing from a domain is allowed)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"No image folder at {root}: lay DomainNet out as {root}/<domain>/<class>/*.jpg.")
    domains = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = sorted(
        {c for d in domains for c in os.listdir(os.path.join(root, d)) if os.path.isdir(os.path.join(root, d, c))}
    )
    files, labels, tags = [], [], []
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            folder = os.path.join(root, d, c)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(folder, name))
                    labels.append(ci)
                    tags.append(di)
    if len(domains) < 2 or not files:
        raise ValueError(
            f"{root} holds {len(domains)} domain folders and {len(files)} images: Res-Dom needs at least two domains "
            f"laid out as {root}/<domain>/<class>/*.jpg (extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return ResDomData(
        _pixels(files, image_size), torch.tensor(labels), torch.tensor(tags), tuple(domains), tuple(classes)
    )


def load_domain_dataset(
    name_or_path: str,
    split: str = "train",
    image_size: int = 32,
    image_column: str = "image",
    label_column: str = "label",
    domain_column: str = "domain",
    max_samples: int | None = None,
) -> ResDomData:
    """One split of a `datasets` data set, from a `save_to_disk` folder or the Hub. String domains are numbered in
    sorted order; integer domains and labels keep their ClassLabel names when the features have them."""
    import datasets

    if os.path.isdir(name_or_path):
        loaded = datasets.load_from_disk(name_or_path)
        data = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        data = datasets.load_dataset(name_or_path, split=split)
    missing = [c for c in (image_column, label_column, domain_column) if c not in data.column_names]
    if missing:
        raise ValueError(
            f"{name_or_path} ({split}) has columns {data.column_names} but no {missing}: name the columns with "
            "--image_column, --label_column and --domain_column."
        )
    if max_samples is not None:
        data = data.shuffle(seed=0).select(range(min(max_samples, len(data))))

    def names_and_ids(column: str) -> tuple[tuple[str, ...], torch.Tensor]:
        values, feature = data[column], data.features[column]
        if isinstance(feature, datasets.ClassLabel):
            return tuple(feature.names), torch.tensor(values)
        if isinstance(values[0], str):
            names = tuple(sorted(set(values)))
            return names, torch.tensor([names.index(v) for v in values])
        ids = torch.tensor(values)
        return tuple(str(i) for i in range(int(ids.max()) + 1)), ids

    domain_names, domains = names_and_ids(domain_column)
    class_names, labels = names_and_ids(label_column)
    return ResDomData(_pixels(data[image_column], image_size), labels, domains, domain_names, class_names)


def split_by_fraction(data: ResDomData, test_fraction: float, seed: int = 0) -> tuple[ResDomData, ResDomData]:
    """A random train/test split (for a folder with no test split)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(data) * test_fraction))
    return data.subset(order[n_test:]), data.subset(order[:n_test])
