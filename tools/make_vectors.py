"""Clustered vectors for index tests and benchmarks: points around fixed centres, overlapping
enough that an IVF index needs nprobe > 1 for high recall."""

from __future__ import annotations

import numpy as np


def mixture(seed: int, rows: int, dim: int, clusters: int, noise: float = 0.8) -> np.ndarray:
    """`rows` float32 points around `clusters` centres (the same centres for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((rows, dim), dtype=np.float32)
    points *= noise
    points += centres[rng.integers(clusters, size=rows)]
    return points
