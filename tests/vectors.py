"""Synthetic embeddings for the search tests: unit vectors, gaussian clusters, cosine distance."""

from __future__ import annotations

import math
import random


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def near(rng: random.Random, center: list[float], spread: float) -> list[float]:
    """A unit vector around ``center``: gaussian noise of ``spread`` per dimension."""
    return unit([c + rng.gauss(0, spread) for c in center])


def cosine(a: list[float], b: list[float]) -> float:
    return 1 - sum(x * y for x, y in zip(a, b, strict=True))
