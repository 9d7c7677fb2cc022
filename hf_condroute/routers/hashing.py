"""Deterministic integer hashing for hash routing: stable across processes, devices, saves and loads.

All arithmetic stays below 2**62 in int64, so nothing overflows and every platform gives the same keys.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import torch

_PRIME = 2**31 - 1  # Mersenne prime modulus
_BASE = 1_000_003
_ROUNDS = ((1_103_515_245, 12_345), (1_664_525, 1_013_904_223), (2_147_483_629, 2_654_435_761 % _PRIME))


@lru_cache(maxsize=64)
def _powers(length: int) -> tuple[int, ...]:
    out, p = [], 1
    for _ in range(length):
        out.append(p)
        p = p * _BASE % _PRIME
    return tuple(out)


def content_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One key per row from the content of its non-padding tokens (position among kept tokens), so left and right
    padding of the same text give the same key."""
    ids = input_ids.long()
    mask = (
        torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -ids.shape[1] :].bool()
    )
    position = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    powers = torch.tensor(_powers(ids.shape[1]), dtype=torch.long, device=ids.device)[position]
    terms = ((ids % _PRIME + 1) * powers) % _PRIME * mask.long()
    return terms.sum(dim=1) % _PRIME


def block_salt(block_name: str, seed: int = 0) -> int:
    """A per-block salt from the block's name, so each block routes an example independently."""
    return (zlib.crc32(block_name.encode("utf-8")) ^ (seed * 2_654_435_761)) % _PRIME


def mix(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """Scramble non-negative keys with a salt into [0, 2**31 - 1)."""
    h = (keys.long() % _PRIME + salt) % _PRIME
    for a, b in _ROUNDS:
        h = (h * a + b) % _PRIME
        h = h ^ (h >> 13)
    return h
