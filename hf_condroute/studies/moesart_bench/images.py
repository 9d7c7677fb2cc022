"""Paper B's real image benchmarks (supplement S6.1) through the `datasets` library: Multi-MNIST and
Multi-FashionMNIST (two tasks) and SVHN (one task).

Where the images come from (`load_source`), for a source "mnist", "fashion_mnist" or "svhn":
1. A dataset saved with `DatasetDict.save_to_disk` in data_dir/<source> or data_dir itself (a `dataset_dict.json`
   there): `datasets.load_from_disk`.
2. Else parquet files named like the hub's, `<split>-*.parquet` or `<split>.parquet` (e.g. a snapshot of the hub
   repository, mnist/train-00000-of-00001.parquet, cropped_digits/extra-0000x-of-0000y.parquet), anywhere under
   data_dir/<source> or data_dir; for SVHN only those under a folder `cropped_digits` when there is one.
3. Else `datasets.load_dataset(hub name, config, cache_dir=data_dir)`: ylecun/mnist, zalando-datasets/fashion_mnist,
   ufldl-stanford/svhn ("cropped_digits"). This downloads on the first use; with the files cached, it runs offline
   under HF_DATASETS_OFFLINE=1. data_dir None: the library's default cache.
Every split has an "image" column (an Image feature) and an integer "label".

Multi-MNIST / Multi-FashionMNIST (Sabour et al. 2017, Hazimeh et al. 2021): two different images a, b drawn
uniformly (with `numpy.random.default_rng([seed, split index])`) from the split's pool; a is placed at the top-left
of a 36x36 canvas (rows and columns 0..27), b at the bottom-right (8..35), each shifted by 4 pixels from the
centre; the overlay is the pixelwise maximum. Task 1 (task1) is a's label, task 2 (task2) b's. Pools: the source's
test split for the test pairs (so no test image is seen in training); its train split, split once by a fixed
permutation (`seed`) into 50,000 images for the training pairs and 10,000 for the validation pairs. Sizes: the
paper's 100,000 / 20,000 / 20,000 pairs (quick: 2,000 / 500 / 500, from pools of at most 2,000 / 500 / 500 images).
SVHN: the source's train split (73,257) for training, test (26,032) for testing and 50,000 images drawn from extra
(531,131) as validation, as the paper has it; without an extra split, 10 % of train (drawn with `seed`) is the
validation set and the other 90 % the training set. Quick: 2,000 / 500 / 500.
Images are kept as uint8 (n, channels, side, side) (100k Multi-MNIST pairs: 130 MB, not 520 MB as float32);
`ByteImageMoE` scales them to [0, 1] in its forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hf_condroute import RoutingConfig, RoutingStep

from ..cli import from_the_hub
from .model import MultiGateMoE
from .tasks import Split

SOURCES = {
    "mnist": ("ylecun/mnist", None),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
}
DIGIT = 28
SHIFT = 4
MULTI_SIDE = DIGIT + 2 * SHIFT  # 36
MULTI_SIZES = (100_000, 20_000, 20_000)
QUICK_SIZES = (2_000, 500, 500)
TRAIN_POOL = 50_000  # of the 60,000 train images; the rest are the validation pairs' pool
SVHN_VAL = 50_000


def _parquet_files(folder: Path, config: str | None) -> dict[str, list[str]]:
    files = sorted(folder.rglob("*.parquet"))
    if config and any(config in f.parts for f in files):
        files = [f for f in files if config in f.parts]
    out: dict[str, list[str]] = {}
    for f in files:
        split = f.stem.split("-")[0]
        out.setdefault(split, []).append(str(f))
    return out


def load_source(source: str, data_dir: str | Path | None = None):
    """A `datasets.DatasetDict` of a source's splits (see the module docstring for where it is read from)."""
    import datasets

    hub, config = SOURCES[source]
    if data_dir is not None:
        root = Path(data_dir)
        for folder in (root / source, root):
            if (folder / "dataset_dict.json").is_file():
                return datasets.load_from_disk(str(folder))
        for folder in (root / source, root):
            if folder.is_dir():
                files = _parquet_files(folder, config)
                if "train" in files and "test" in files:
                    return datasets.load_dataset("parquet", data_files=files)
    kwargs = {} if data_dir is None else {"cache_dir": str(data_dir)}
    with from_the_hub(f"the {source} images", hub, "--data_dir (a `save_to_disk` folder or the Hub's parquet files)"):
        return datasets.load_dataset(hub, config, **kwargs)


def to_arrays(ds, indices=None, rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, side, side) or (n, 3, side, side) when rgb, labels int64 (n,)) of a split's rows."""
    if indices is not None:
        ds = ds.select(np.asarray(indices).tolist())
    mode = "RGB" if rgb else "L"
    images = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in ds["image"]])
    if rgb:
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.asarray(ds["label"], dtype=np.int64)


def make_pairs(images: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple:
    """size overlaid pairs of two different images of the pool: (images (size, 1, 36, 36) uint8, labels (size, 2),
    sources (size, 2) the pool indices)."""
    a = rng.integers(0, len(images), size)
    b = (a + rng.integers(1, len(images), size)) % len(images)
    canvas = np.zeros((size, MULTI_SIDE, MULTI_SIDE), dtype=np.uint8)
    canvas[:, :DIGIT, :DIGIT] = images[a]
    canvas[:, 2 * SHIFT :, 2 * SHIFT :] = np.maximum(canvas[:, 2 * SHIFT :, 2 * SHIFT :], images[b])
    return canvas[:, None], np.stack([labels[a], labels[b]], axis=1), np.stack([a, b], axis=1)


def multi_task_splits(source: str, data_dir=None, quick: bool = False, seed: int = 0) -> dict[str, Split]:
    """{"train", "val", "test"} of Multi-MNIST or Multi-FashionMNIST (module docstring). Each Split also carries
    `sources` (n, 2) and `pool` (the pool's indices into the source split) for checks."""
    dd = load_source(source, data_dir)
    sizes = QUICK_SIZES if quick else MULTI_SIZES
    perm = np.random.default_rng(seed).permutation(len(dd["train"]))
    n_train_pool = min(TRAIN_POOL, int(round(len(perm) * TRAIN_POOL / 60_000)))
    pools = {"train": perm[:n_train_pool], "val": perm[n_train_pool:], "test": np.arange(len(dd["test"]))}
    out = {}
    for s, split in enumerate(("train", "val", "test")):
        pool = pools[split]
        if quick:
            pool = pool[: sizes[s]]
        if len(pool) < 2:
            raise ValueError(f"{source}: the {split} pool needs at least 2 images, got {len(pool)}.")
        images, labels = to_arrays(dd["test" if split == "test" else "train"], pool)
        x, y, src = make_pairs(images, labels, sizes[s], np.random.default_rng([seed, s]))
        out[split] = Split(torch.from_numpy(x), torch.from_numpy(y).float())
        out[split].sources, out[split].pool = torch.from_numpy(src), torch.from_numpy(pool)
    return out


def svhn_splits(data_dir=None, quick: bool = False, seed: int = 0) -> tuple[dict[str, Split], str]:
    """({"train", "val", "test"} of SVHN as (n, 3, 32, 32) uint8 with one label column, where validation came from)."""
    dd = load_source("svhn", data_dir)
    rng = np.random.default_rng(seed)
    n_train = len(dd["train"])
    if "extra" in dd:
        train_idx = np.arange(n_train)
        val_idx = rng.permutation(len(dd["extra"]))[:SVHN_VAL]
        val_from = "extra"
    else:
        perm = rng.permutation(n_train)
        n_val = max(1, n_train // 10)
        train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        val_from = "train"
    test_idx = np.arange(len(dd["test"]))
    if quick:
        train_idx, val_idx, test_idx = (i[:n] for i, n in zip((train_idx, val_idx, test_idx), QUICK_SIZES))
    out = {}
    for split, src, idx in (("train", "train", train_idx), ("val", val_from, val_idx), ("test", "test", test_idx)):
        x, y = to_arrays(dd[src], idx, rgb=True)
        out[split] = Split(torch.from_numpy(x), torch.from_numpy(y).float()[:, None])
    return out, val_from


class ByteImageMoE(MultiGateMoE):
    """`MultiGateMoE` on uint8 images (scaled to [0, 1] here); float images pass as they are."""

    def forward(self, images: torch.Tensor, step: RoutingStep | None = None) -> dict[str, torch.Tensor]:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return super().forward(images, step)


def image_model(config: RoutingConfig, side: int, tasks: tuple[str, ...], channels: int = 1) -> ByteImageMoE:
    return ByteImageMoE(config, side=side, tasks=tasks, channels=channels)
