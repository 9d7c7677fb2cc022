"""The DAE-Syn images of paper A section 3: every combination of four factors with 8 values each.

Factors, in tag-group order: letter identity, letter position, letter (foreground) colour, background colour.
The two colour palettes are disjoint, so the letter is always visible. Images are drawn with Pillow's built-in
font (`ImageFont.load_default(size=...)`, no font file needed), so the set is the same on every machine with the
same Pillow version.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FACTORS = ("letter", "position", "foreground", "background")
NUM_VALUES = 8
LETTERS = "ABEHKOSX"  # visually distinct capitals
FOREGROUND = (
    (255, 0, 0), (0, 255, 0), (0, 96, 255), (255, 255, 0),
    (255, 0, 255), (0, 255, 255), (255, 128, 0), (255, 255, 255),
)  # fmt: skip
BACKGROUND = (
    (0, 0, 0), (0, 0, 96), (0, 80, 0), (96, 0, 0),
    (64, 0, 96), (0, 80, 80), (96, 96, 0), (80, 80, 80),
)  # fmt: skip
# the 3 x 3 grid of cell centres without the middle one, in units of a third of the image
POSITIONS = tuple((col, row) for row in range(3) for col in range(3) if (col, row) != (1, 1))


@dataclass(frozen=True)
class DAESynData:
    images: torch.Tensor  # (4096, 3, S, S) float32 in [0, 1]
    tags: torch.Tensor  # (4096, 4) long: the factor values, columns in FACTORS order

    def __post_init__(self):
        # channels_last once, here, as the model's convolutions use it (a no-op for images already in it)
        object.__setattr__(self, "images", self.images.contiguous(memory_format=torch.channels_last))

    def __len__(self) -> int:
        return self.images.shape[0]


def render_image(letter: int, position: int, foreground: int, background: int, image_size: int = 32) -> Image.Image:
    """One image: LETTERS[letter] centred on grid cell POSITIONS[position], in FOREGROUND[foreground] on
    BACKGROUND[background]."""
    for name, value in zip(FACTORS, (letter, position, foreground, background)):
        if not 0 <= value < NUM_VALUES:
            raise ValueError(f"{name} must be in 0..{NUM_VALUES - 1}, got {value}.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 for the letters to be legible, got {image_size}.")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND[background])
    cell = image_size / 3
    col, row = POSITIONS[position]
    centre = ((col + 0.5) * cell, (row + 0.5) * cell)
    font = _font(round(image_size * 0.44))
    ImageDraw.Draw(image).text(centre, LETTERS[letter], fill=FOREGROUND[foreground], font=font, anchor="mm")
    return image


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def make_dataset(image_size: int = 32) -> DAESynData:
    """All 8^4 = 4096 images; image i has factor values tags[i], enumerated with the background fastest."""
    combos = list(itertools.product(range(NUM_VALUES), repeat=len(FACTORS)))
    pixels = np.stack([np.asarray(render_image(*c, image_size=image_size)) for c in combos])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return DAESynData(images=images, tags=torch.tensor(combos, dtype=torch.long))
