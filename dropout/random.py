"""Random training-set dropout: keep a uniform sample of the training images (prior-art.md §3c, Experiment 1).

The precursor study sampled without replacement at fractions 0.75 / 0.5 / 0.25 / 0.1 and repeated the
draw to estimate the variance a random subset brings; ``draw`` numbers those repeats.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import UserError


def subset_size(n: int, fraction: float, what: str = "fraction") -> int:
    """Number of images a ``fraction`` of ``n`` keeps: round half up of fraction·n (0.25·1200 = 300).

    ``fraction`` must lie in (0, 1] and keep at least one image; anything else is a :class:`UserError`.
    Shared by every selector so that "fraction" means the same thing for all of them.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise UserError(f"{what}: expected a number in (0, 1], got {type(fraction).__name__} {fraction!r}")
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise UserError(f"{what}: expected a number in (0, 1], got {fraction!r}")
    if int(n) < 1:
        raise UserError(f"{what}: the training set is empty (n = {n})")
    k = int(math.floor(fraction * int(n) + 0.5))
    if k < 1:
        raise UserError(f"{what}: {fraction!r} of {n} images keeps none; use a larger fraction")
    return min(k, int(n))


def draw_seed_sequence(seed: int, draw: int) -> np.random.SeedSequence:
    """One independent random stream per (seed, draw); the same pair always gives the same stream."""
    seed, draw = int(seed), int(draw)
    if seed < 0 or draw < 0:
        raise UserError(f"seed and draw must be non-negative integers, got seed={seed}, draw={draw}")
    return np.random.SeedSequence([seed, draw])


def select_random(n: int, fraction: float, draw: int = 0, seed: int = 0) -> np.ndarray:
    """Indices of a uniform random subset of ``round(fraction·n)`` of the ``n`` training images.

    Sampled without replacement from ``np.random.default_rng(SeedSequence([seed, draw]))``, so a
    (seed, draw) pair always gives the same subset and different draws are independent samples.

    Returns: (k,) int64, sorted ascending, unique, each in 0..n-1.
    """
    k = subset_size(n, fraction)
    rng = np.random.default_rng(draw_seed_sequence(seed, draw))
    chosen = rng.choice(int(n), size=k, replace=False)
    return np.sort(chosen).astype(np.int64)
