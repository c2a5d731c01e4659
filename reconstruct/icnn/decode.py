"""Step ``icnn_decode`` (iCNN stage 2, per variant): fMRI → VGG19 features with the variant's training rows.

fMRI is z-scored with the training mean/std (ddof=1), as the lab does. Decoder: ``icnn.n_voxels = 0``
(default) uses :class:`regression.ridge.MultiTargetRidge` with all voxels — one eigendecomposition
shared by all 19 layers, ~15M units streamed in column chunks; this equals the lab's FastL2LiR on
z-scored X and Y when no voxels are selected (X and Y are centred, so the penalised intercept is 0).
``n_voxels > 0`` uses ``fastl2lir`` with that many voxels selected per unit (the lab's 500): more
faithful, but one solve per unit makes it practical only for the fc layers. Raw predictions go to
``predictions/icnn/<layer>_test.npy`` (decoder metrics use them), the decoder's training mean to
``<layer>_train_mean.npy``.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from pipeline import io
from pipeline.common_format import part_path, read_split
from pipeline.errors import UserError
from pipeline.variant import load_variant, variant_files
from regression.ridge import MAX_MEMORY_GB
from reconstruct.icnn.common import SPLITS, STD_DDOF, check_settings, feature_std

log = logging.getLogger("recon")
STEP = "icnn_decode"


class RowSubset:
    """Rows ``index`` of a (memory-mapped) array, read lazily column chunk by column chunk.

    Quacks like the (n, ...) target arrays :class:`MultiTargetRidge` streams (``shape``, ``ndim``,
    ``dtype``, ``reshape(n, T)``, ``[:, cols]``), so a variant's rows are never copied as a whole.
    """

    def __init__(self, base: np.ndarray, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index),) + tuple(base.shape[1:])
        self.ndim, self.dtype = len(self.shape), base.dtype

    def reshape(self, n: int, t: int) -> "RowSubset":
        return RowSubset(self.base.reshape(self.base.shape[0], t), self.index)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if rows != slice(None):
            raise IndexError("RowSubset supports [:, columns] only")
        return np.asarray(self.base[self.index, cols])


def decode_features(X: np.ndarray, X_test: np.ndarray, targets: Mapping[str, np.ndarray], *, alpha: float,
                    n_voxels: int = 0, device: str = "cpu", max_memory_gb: float = MAX_MEMORY_GB, progress: bool = True,
                    out: Mapping[str, object] | None = None) -> tuple[dict, dict]:
    """Ridge-decode each target layer from normalised fMRI.

    X: (n, p), X_test: (m, p), both z-scored with the training statistics; targets: {layer: (n, *shape)}.
    Returns ({layer: float32 (m, *shape) predictions}, {layer: float32 (*shape) training mean}). With
    ``out`` = {layer: callable(pred, mean)} each layer is handed over and dropped instead (memory).
    ``n_voxels`` = 0 (or ≥ p): all voxels, one decomposition; > 0: fastl2lir with per-unit selection.
    """
    X = np.asarray(X, np.float64)
    X_test = np.asarray(X_test, np.float64)
    # the training mean of X is 0 after z-scoring, so the ridge predicts ȳ there: one extra row
    # yields the decoder's training mean without another pass over the targets
    X_aug = np.vstack([X_test, X.mean(axis=0, keepdims=True)])
    preds, means = {}, {}

    def hand_over(layer, p):
        pred, mean = p[:-1].astype(np.float32), p[-1].astype(np.float32)
        if out is not None:
            out[layer](pred, mean)
        else:
            preds[layer], means[layer] = pred, mean

    if n_voxels <= 0 or n_voxels >= X.shape[1]:
        from regression.ridge import MultiTargetRidge

        model = MultiTargetRidge(alphas=float(alpha), device=device, max_memory_gb=max_memory_gb, rescale=False,
                                 progress=progress)
        model.fit(X, dict(targets))
        views = dict(model.targets_)
        for layer in tqdm(list(targets), desc="decode VGG19 layers", unit="layer", disable=not progress):
            model.targets_ = {layer: views[layer]}  # predict one layer at a time (bounded memory)
            hand_over(layer, model.predict(X_aug)[layer])
        model.targets_ = views
    else:
        for layer, Y in targets.items():
            hand_over(layer, _fastl2lir_layer(X, X_aug, Y, alpha, n_voxels, max_memory_gb))
    return preds, means


def _fastl2lir_layer(X, X_aug, Y, alpha, n_voxels, max_memory_gb) -> np.ndarray:
    """The lab's decoder for one layer: Y z-scored (ddof=1), FastL2LiR with ``n_voxels`` per unit."""
    from fastl2lir import FastL2LiR

    n, shape = Y.shape[0], tuple(Y.shape[1:])
    T = math.prod(shape)
    flat = Y.reshape(n, T)
    pred = np.empty((X_aug.shape[0], T), dtype=np.float64)
    chunk = int(max(1, min(T, max_memory_gb * 2**30 // (8 * (3 * X.shape[1] + 2 * n)))))
    for s in range(0, T, chunk):
        y = np.asarray(flat[:, s:s + chunk], dtype=np.float64)
        mu, sd = y.mean(axis=0), y.std(axis=0, ddof=STD_DDOF)
        sd[sd == 0] = 1.0
        model = FastL2LiR().fit(X, (y - mu) / sd, alpha=float(alpha), n_feat=int(n_voxels), dtype=np.float64)
        pred[:, s:s + chunk] = model.predict(X_aug, dtype=np.float64) * sd + mu
        pred[-1, s:s + chunk] = mu  # exact training mean (the model's intercept is ~0 here)
    return pred.reshape((X_aug.shape[0],) + shape)


def scale_decoded(pred: np.ndarray, train_mean: np.ndarray, reference_std: float) -> np.ndarray:
    """The lab's ``feature_std_train_mean_center`` for one decoded sample (*unit_shape) → float32.

    ``((pred − ȳ) / s) · s_ref + ȳ`` with ``s`` = :func:`feature_std` of ``pred − ȳ``.
    """
    a = np.asarray(pred, np.float64) - train_mean
    s = float(feature_std(a[None])[0])
    if s > 0 and math.isfinite(s):
        a = a / s * float(reference_std)
    return (a + train_mean).astype(np.float32)


def run(ctx) -> None:
    from regression.ridge import normalise_fmri

    layers = check_settings(ctx.cfg)
    layout, c = ctx.layout, ctx.cfg.icnn
    train = read_split(layout.base.data_dir, "train", ctx.subject, parts=("fmri",))
    test = read_split(layout.base.data_dir, "test", ctx.subject, parts=("fmri",))
    variant = load_variant(layout, len(train))
    X = np.asarray(train.fmri)
    targets = {}
    for l in layers:
        Y = io.load_npy(layout.icnn_features(l, "train"), mmap_mode="r")
        if Y.shape[0] != X.shape[0]:
            raise UserError(f"{layout.icnn_features(l, 'train')}: {Y.shape[0]} rows but the training fMRI has "
                            f"{X.shape[0]} (rerun the icnn step with --force)")
        targets[l] = Y if variant.indices is None else RowSubset(Y, variant.indices)
    if variant.indices is not None:
        X = X[variant.indices]
    X, X_test, _ = normalise_fmri(X, np.asarray(test.fmri), scale=1.0)

    def save(layer):
        def fn(pred, mean):
            io.save_npy(layout.icnn_prediction(layer), pred)
            io.save_npy(layout.icnn_train_mean(layer), mean)
        return fn

    log.info("[icnn] decoding %d layers from %d training images x %d voxels (%s)", len(layers), X.shape[0],
             X.shape[1], "all voxels, MultiTargetRidge" if c.n_voxels <= 0 or c.n_voxels >= X.shape[1]
             else f"fastl2lir, {c.n_voxels} voxels per unit")
    decode_features(X, X_test, targets, alpha=c.alpha, n_voxels=c.n_voxels, device=ctx.device,
                    max_memory_gb=ctx.cfg.ridge.max_memory_gb, progress=ctx.progress,
                    out={l: save(l) for l in layers})


def outputs(ctx) -> list[Path]:
    layers = check_settings(ctx.cfg)
    return [ctx.layout.icnn_prediction(l) for l in layers] + [ctx.layout.icnn_train_mean(l) for l in layers]


def inputs(ctx) -> list[Path]:
    layout = ctx.layout
    return ([part_path(layout.base.data_dir, s, "fmri", ctx.subject) for s in SPLITS] + variant_files(layout)
            + [layout.icnn_features(l, "train") for l in check_settings(ctx.cfg)])


def main(argv=None) -> int:
    from pipeline.step_entry import step_main

    return step_main(STEP, argv)


if __name__ == "__main__":
    sys.exit(main())
