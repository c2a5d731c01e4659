"""Plain-background vs heterogeneous training subsets ("quantizedCountBoring / Party", prior-art.md §3c).

An image whose pixels mostly share one coarse colour (a plain background) is "monotone"; one whose
most common coarse colour covers few pixels is "heterogeneous". The study resized every image to
100x100 RGB, quantised each channel into bins of 10 levels, counted the pixels of the most frequent
(r, g, b) bin, and kept the top 25% by that count (monotone) or the bottom 25% (heterogeneous).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dropout.random import subset_size
from pipeline.errors import UserError

COUNT_SIZE = 100  # images are compared at 100x100 px
BIN_WIDTH = 10  # channel value v falls in bin v // 10 (26 bins; the last one holds 250..255)
SUBSETS = ("monotone", "heterogeneous")
PROGRESS_MIN_ITEMS = 256


def _check_stim(stim: np.ndarray) -> None:
    if not hasattr(stim, "shape") or len(stim.shape) != 4 or stim.shape[-1] != 3 or stim.dtype != np.uint8:
        got = f"{getattr(stim, 'dtype', type(stim).__name__)} {getattr(stim, 'shape', '')}"
        raise UserError(f"stim: expected uint8 images of shape (n, H, W, 3), got {got}")


def dominant_colour_counts(stim: np.ndarray, size: int = COUNT_SIZE, bin_width: int = BIN_WIDTH) -> np.ndarray:
    """Pixels in the most frequent quantised colour of each image.

    Each image is resized to size x size (PIL bilinear; skipped when it already has that size; the
    study's filter is not recorded), each channel value v becomes v // bin_width, and the pixels of
    the most frequent (r, g, b) bin triple are counted.

    stim: (n, H, W, 3) uint8 (a memory map is read one image at a time).
    Returns: (n,) int64 in 1..size².
    """
    _check_stim(stim)
    size, bin_width = int(size), int(bin_width)
    if size < 1 or not (1 <= bin_width <= 256):
        raise UserError(f"dominant colour: size must be >= 1 and bin_width in 1..256, got {size}, {bin_width}")
    n_bins = 255 // bin_width + 1  # bins per channel
    n = stim.shape[0]
    counts = np.empty(n, dtype=np.int64)
    for i in tqdm(range(n), desc="dominant colour", disable=n < PROGRESS_MIN_ITEMS):
        img = np.asarray(stim[i])
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        q = img.reshape(-1, 3).astype(np.int64) // bin_width
        code = (q[:, 0] * n_bins + q[:, 1]) * n_bins + q[:, 2]
        counts[i] = np.bincount(code, minlength=n_bins ** 3).max()
    return counts


def plainness_ranking(counts: np.ndarray) -> np.ndarray:
    """Image indices from most to least plain: dominant-colour count descending, ties by index ascending."""
    return np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")


def select_plain(stim: np.ndarray, subset: str, fraction: float = 0.25) -> np.ndarray:
    """The round(fraction·n) most plain ('monotone') or least plain ('heterogeneous') training images.

    One ranking (:func:`plainness_ranking`) serves both: 'monotone' is its head, 'heterogeneous' its
    tail. Ties are therefore broken by index — lower index counts as plainer — and the two subsets
    never overlap while fraction <= 0.5.

    stim: (n, H, W, 3) uint8. Returns: (k,) int64, sorted ascending, unique.
    """
    if subset not in SUBSETS:
        raise UserError(f"plain subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    _check_stim(stim)
    n = stim.shape[0]
    k = subset_size(n, fraction)
    ranking = plainness_ranking(dominant_colour_counts(stim))
    chosen = ranking[:k] if subset == "monotone" else ranking[n - k:]
    return np.sort(chosen).astype(np.int64)
