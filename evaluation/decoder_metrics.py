"""How well decoded (predicted) features match the true ones, as the Kamitani lab scores decoders.

Conventions of ``bdpy.evals.metrics`` (bdpy 0.26) and the lab's feature-decoding evaluation scripts:

* **profile correlation**: per feature, Pearson r across the test samples -> (D,); report the nanmean.
* **pattern correlation**: per sample, Pearson r across features -> (N,), after z-scoring both
  arrays with the *training* features' mean and std when those are given (the lab passes
  ``mean=y_mean, std=y_norm`` of the training set); report the nanmean.
* **pairwise identification**: for prediction i, the fraction of true samples j != i with
  ``r(pred_i, true_j) < r(pred_i, true_i)`` (strict; NaN correlations are left out, as bdpy does)
  -> (N,); chance 0.5.

Pattern correlation calls bdpy itself. Profile correlation and identification are vectorised here
(bdpy loops over features in Python, and uses a non-BLAS ``cdist``; both are slow for the
200k-dimensional CLIP-vision features); the tests check them against bdpy.
"""
from __future__ import annotations

import warnings

import numpy as np

from evaluation.metrics import correlation_matrix
from pipeline.errors import UserError


def _as_2d(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape or pred.ndim < 2:
        raise UserError(f"predicted and true features must have the same (N, ...) shape, got {pred.shape} and {true.shape}")
    if len(pred) < 2:
        raise UserError(f"need at least 2 samples to score a decoder, got {len(pred)}")
    return pred.reshape(len(pred), -1), true.reshape(len(true), -1)


def profile_correlation(pred: np.ndarray, true: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Per-feature Pearson r across samples: (N, ...) x2 -> (D,) float64; constant features give NaN."""
    p, t = _as_2d(pred, true)
    out = np.empty(p.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in range(0, p.shape[1], chunk):
            a = p[:, s : s + chunk].astype(np.float64)
            b = t[:, s : s + chunk].astype(np.float64)
            a -= a.mean(axis=0)
            b -= b.mean(axis=0)
            out[s : s + chunk] = (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return out


def pattern_correlation(
    pred: np.ndarray, true: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> np.ndarray:
    """Per-sample Pearson r across features -> (N,), optionally after (x - mean) / std on both.

    mean, std: the training features' per-feature mean and std, shape (D,) or (1, ...).
    """
    from bdpy.evals.metrics import pattern_correlation as bdpy_pattern_correlation

    p, t = _as_2d(pred, true)
    if (mean is None) != (std is None):
        raise UserError("pattern_correlation: give both the training mean and std, or neither")
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.size != p.shape[1] or std.size != p.shape[1]:
            raise UserError(f"training mean/std have {mean.size}/{std.size} values, features have {p.shape[1]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant rows -> NaN, reported as NaN
        return bdpy_pattern_correlation(p, t, mean=mean, std=std)


def pairwise_identification(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-prediction identification accuracy against all other true samples -> (N,) float64."""
    p, t = _as_2d(pred, true)
    r = correlation_matrix(p, t)  # rows: predictions, columns: true candidates
    congruent = np.diag(r)[:, None]
    valid = ~np.isnan(r)
    wins = ((r < congruent) & valid).sum(axis=1)
    n_valid = valid.sum(axis=1) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = wins / n_valid
    acc[np.isnan(np.diag(r)) | (n_valid <= 0)] = np.nan
    return acc


def evaluate_decoder(
    pred: np.ndarray,
    true: np.ndarray,
    train_mean: np.ndarray | None = None,
    train_std: np.ndarray | None = None,
) -> dict:
    """All three scores for one feature set.

    pred, true: (N, ...) decoded and true test features, rows matched. train_mean/train_std: the
    training features' per-feature statistics for pattern correlation (both or neither).
    Returns {"profile_correlation", "pattern_correlation", "identification_accuracy": nanmeans,
    "per_feature": {"profile_correlation": (D,)}, "per_sample": {"pattern_correlation": (N,),
    "identification_accuracy": (N,)}, "n_samples", "n_features", "pattern_normalised"}.
    """
    prof = profile_correlation(pred, true)
    patt = pattern_correlation(pred, true, train_mean, train_std)
    ident = pairwise_identification(pred, true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN
        return {
            "profile_correlation": float(np.nanmean(prof)),
            "pattern_correlation": float(np.nanmean(patt)),
            "identification_accuracy": float(np.nanmean(ident)),
            "per_feature": {"profile_correlation": prof},
            "per_sample": {"pattern_correlation": patt, "identification_accuracy": ident},
            "n_samples": int(np.asarray(pred).shape[0]),
            "n_features": int(prof.size),
            "pattern_normalised": train_mean is not None,
        }
