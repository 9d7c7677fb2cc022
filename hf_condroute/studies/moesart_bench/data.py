"""Multi-Digits: paper B's Multi-MNIST (supplement S6.1; Sabour et al. 2017, Hazimeh et al. 2021) built from
scikit-learn's bundled real handwritten digits (`load_digits`: 1797 8x8 images, grey levels 0..16), no download.

Construction, scaled from MNIST's 28x28 digits shifted by 4 pixels onto a 36x36 canvas:
1. Each 8x8 digit is scaled to [0, 1] (divided by 16) and enlarged 2x by pixel repetition to 16x16.
2. The 1797 source digits are split once (a fixed permutation, `split_seed`) into disjoint pools, 60 / 20 / 20 %
   for train / validation / test, so no handwritten digit of the test pairs is seen in training.
3. Within each pool, pairs (a, b) of two different digits are drawn uniformly; a goes to the top-left corner of a
   20x20 canvas (rows and columns 0..15), b to the bottom-right (4..19): each is shifted by 2 pixels from the
   centre, so they overlap on 12x12 pixels as MNIST's do on 20x20. The overlay is the pixelwise maximum.
4. Task 1 is a's label (top-left), task 2 is b's (bottom-right).
Defaults: 10,000 / 2,000 / 2,000 pairs (the paper's 100k / 20k / 20k in the same 5:1:1 ratio), from `pair_seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGIT = 16  # side of an enlarged digit
SHIFT = 2  # pixels each digit is shifted from the centre
CANVAS = DIGIT + 2 * SHIFT
SPLITS = ("train", "val", "test")
POOL_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass
class MultiDigits:
    """One split: images (n, 1, CANVAS, CANVAS) float32 in [0, 1], labels (n, 2) long (top-left, bottom-right),
    sources (n, 2) the indices into `load_digits()` of the two digits."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def enlarge(digit: np.ndarray) -> np.ndarray:
    """An 8x8 digit (grey levels 0..16) as a 16x16 one in [0, 1], each pixel repeated 2x2."""
    return np.kron(digit.astype(np.float32) / 16.0, np.ones((2, 2), dtype=np.float32))


def overlay(top_left: np.ndarray, bottom_right: np.ndarray) -> np.ndarray:
    """Two enlarged digits on one canvas: the first at the top-left, the second at the bottom-right, max-overlaid."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[:DIGIT, :DIGIT] = top_left
    canvas[2 * SHIFT :, 2 * SHIFT :] = np.maximum(canvas[2 * SHIFT :, 2 * SHIFT :], bottom_right)
    return canvas


def source_pools(n: int, split_seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint index pools of the source digits, 60 / 20 / 20 % of a fixed permutation."""
    perm = np.random.default_rng(split_seed).permutation(n)
    a = int(round(POOL_FRACTIONS[0] * n))
    b = a + int(round(POOL_FRACTIONS[1] * n))
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}


def make_multi_digits(
    sizes: tuple[int, int, int] = (10_000, 2_000, 2_000), split_seed: int = 0, pair_seed: int = 0
) -> dict[str, MultiDigits]:
    """{"train", "val", "test"}: Multi-Digits pairs (see the module docstring)."""
    from sklearn.datasets import load_digits

    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive pair counts (train, val, test), got {sizes}.")
    digits = load_digits()
    big = np.stack([enlarge(d) for d in digits.images])
    targets = digits.target
    pools = source_pools(len(targets), split_seed)
    out = {}
    for i, (split, size) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([pair_seed, i])
        pool = pools[split]
        a = rng.integers(0, len(pool), size)
        b = (a + rng.integers(1, len(pool), size)) % len(pool)  # uniform over the other digits of the pool
        src = np.stack([pool[a], pool[b]], axis=1)
        images = np.stack([overlay(big[s], big[t]) for s, t in src])[:, None]
        out[split] = MultiDigits(
            images=torch.from_numpy(images),
            labels=torch.from_numpy(targets[src]).long(),
            sources=torch.from_numpy(src).long(),
        )
    return out
