"""Caption controls of Experiment 2 (prior-art.md §3c): shuffled human captions and "badshuffle".

* :func:`shuffle_captions` (training-time control): each image keeps exactly one human caption,
  but it is another image's. The first non-empty caption of every image is taken, and these
  captions are permuted among the captioned images with a seeded, uniformly random
  *derangement* (no image keeps its own caption row; rejection sampling of permutations,
  about e ≈ 2.7 draws on average). With a single captioned image no derangement exists and it
  keeps its caption. Images without any caption stay ''.
* :func:`shuffle_elements` (reconstruction-time control "badshuffle", called by the versatile
  step on the predicted CLIP-text features): every value of the whole (n, 77, D) array is moved
  to a random position (one seeded permutation of all n·77·D elements). Images, tokens and
  dimensions are all mixed, so no structure survives but the value distribution (mean, variance,
  range) of the predictions is kept exactly.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import UserError

MAX_DRAWS = 10_000  # rejection sampling: P(no derangement in 10k draws) ≈ (1 - 1/e)^10000 ≈ 0


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of 0..n-1 with no fixed point (identity for n < 2)."""
    if n < 2:
        return np.arange(n)
    for _ in range(MAX_DRAWS):
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm
    raise RuntimeError("no derangement found")  # pragma: no cover - probability ~0


def first_captions(captions: np.ndarray) -> np.ndarray:
    """(n, n_cap) unicode → (n,): the first non-blank caption of each image ('' if none)."""
    caps = np.asarray(captions)
    if caps.dtype.kind != "U" or caps.ndim != 2:
        raise UserError(f"captions: expected a unicode (n_images, n_captions) array, got {caps.dtype} {caps.shape}")
    present = np.char.str_len(np.char.strip(caps)) > 0
    first = np.argmax(present, axis=1)
    out = caps[np.arange(len(caps)), first] if caps.shape[1] else np.full(len(caps), "", dtype=caps.dtype)
    out[~present.any(axis=1)] = ""
    return out


def shuffle_captions(captions: np.ndarray, seed: int) -> np.ndarray:
    """(n, n_cap) human captions → (n, 1): image i gets the first caption of image perm[i], a seeded
    derangement over the captioned images (see the module docstring)."""
    first = first_captions(captions)
    has = np.flatnonzero(np.char.str_len(first) > 0)
    perm = derangement(len(has), np.random.default_rng(seed))
    out = np.full(len(first), "", dtype=first.dtype)
    out[has] = first[has[perm]]
    return out[:, None]


def shuffle_elements(array: np.ndarray, seed: int) -> np.ndarray:
    """Any-shape array (e.g. predicted CLIP-text (n, 77, D)) → same shape and dtype with all its
    elements permuted by one seeded permutation (badshuffle)."""
    arr = np.asarray(array)
    perm = np.random.default_rng(seed).permutation(arr.size)
    return arr.reshape(-1)[perm].reshape(arr.shape)
