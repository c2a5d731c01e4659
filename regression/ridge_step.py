"""Step 3, ``ridge``: fMRI → VDVAE / CLIP-text / CLIP-vision, predicted on the test set.

All three target groups are solved from one decomposition of the training fMRI
(:class:`regression.ridge.MultiTargetRidge`), with the reference alphas by default. The test
predictions are re-standardised as Brain-Diffuser does unless ``ridge.rescale = false``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.common_format import part_path, read_split
from pipeline.config import BASE_VARIANT
from pipeline.errors import UserError
from pipeline.layout import TARGETS
from pipeline.step_entry import step_main
from pipeline.variant import load_variant, variant_files
from regression.extract_features import train_target_path, train_targets

log = logging.getLogger("recon")


def training_data(ctx):
    """(X_train, X_test, {target: Y_train}) for the context's variant (rows selected)."""
    layout = ctx.layout
    train = read_split(layout.base.data_dir, "train", ctx.subject, parts=("fmri",))
    test = read_split(layout.base.data_dir, "test", ctx.subject, parts=("fmri",))
    variant = load_variant(layout, len(train))
    Y = {t: train_targets(layout, t) for t in TARGETS}
    X = train.fmri
    if test.fmri.shape[1] != X.shape[1]:
        raise UserError(f"{part_path(layout.base.data_dir, 'test', 'fmri', ctx.subject)}: {test.fmri.shape[1]} voxels "
                        f"but the training fMRI has {X.shape[1]}")
    stim_path = part_path(layout.base.data_dir, "train", "stim", ctx.subject)
    n_stim = io.load_npy(stim_path, mmap_mode="r").shape[0] if stim_path.is_file() else X.shape[0]
    if n_stim != X.shape[0]:  # the features follow the images: the fMRI file is the odd one out
        raise UserError(f"{part_path(layout.base.data_dir, 'train', 'fmri', ctx.subject)}: {X.shape[0]} rows but "
                        f"{stim_path.name} has {n_stim} images; rerun the prepare step with --force")
    for t, y in Y.items():
        if y.shape[0] != X.shape[0]:
            raise UserError(f"{train_target_path(layout, t)}: {y.shape[0]} rows but the training fMRI has "
                            f"{X.shape[0]} (rerun the features step with --force)")
    if variant.indices is not None:
        X = X[variant.indices]
        Y = {t: np.asarray(y[variant.indices]) for t, y in Y.items()}
    return X, test.fmri, Y


def run(ctx) -> None:
    from regression.ridge import MultiTargetRidge, normalise_fmri

    r = ctx.cfg.ridge
    if r.save_weights:
        weights_dtype(r.weights_dtype)
    fit = list(TARGETS)
    if needs_base(ctx):  # same training rows: only re-fit the targets the variant changed
        fit = load_variant(ctx.layout).changed_targets()
        for target in TARGETS:
            if target not in fit:
                io.save_npy(ctx.layout.prediction(target), io.load_npy(ctx.layout.base.prediction(target)))
        if not fit:
            return
    X, X_test, Y = training_data(ctx)
    Y = {t: Y[t] for t in fit}
    X, X_test, stats = normalise_fmri(X, X_test, scale=r.fmri_scale)
    if len(stats["constant_voxels"]):
        log.warning("[ridge] sub%s: %d voxels are constant over the training images; they are left out "
                    "(z-scoring them would divide by zero)", ctx.subject, len(stats["constant_voxels"]))
    alphas = {"vdvae": r.alpha_vdvae, "cliptext": r.alpha_cliptext, "clipvision": r.alpha_clipvision}
    model = MultiTargetRidge(alphas={t: alphas[t] for t in fit}, device=ctx.device, max_memory_gb=r.max_memory_gb,
                             rescale=r.rescale, cv_alphas=list(r.cv_alphas) if r.cv else None)
    model.fit(X, Y)
    predictions = model.predict(X_test)
    for target in fit:
        io.save_npy(ctx.layout.prediction(target), predictions[target].astype(np.float32))
    if r.save_weights:
        dtype = weights_dtype(r.weights_dtype)
        for target in fit:  # one streamed safetensors file per target group
            model.save_weights(ctx.layout.ridge_weights(target), dtype=dtype, names=[target])
        save_normalisation(normalisation_path(ctx.layout), stats)
    chosen = getattr(model, "alphas_", None) or {t: alphas[t] for t in fit}
    log.info("[ridge] sub%s/%s: n_train=%d, voxels=%d, alphas=%s", ctx.subject, ctx.variant, X.shape[0],
             X.shape[1], {k: float(np.mean(v)) for k, v in chosen.items()})


WEIGHTS_DTYPES = ("float16", "float32", "float64")


def weights_dtype(name: str) -> np.dtype:
    """``ridge.weights_dtype`` as a numpy dtype (checked before the long fit, not after)."""
    if name not in WEIGHTS_DTYPES:
        raise UserError(f"ridge.weights_dtype = {name!r}: expected one of {', '.join(WEIGHTS_DTYPES)}")
    return np.dtype(name)


def normalisation_path(layout) -> Path:
    """Beside the saved weights: ``weights/fmri_normalisation.safetensors``."""
    return layout.ridge_weights("vdvae").parent / "fmri_normalisation.safetensors"


def save_normalisation(path: Path, stats: dict) -> Path:
    """The fMRI normalisation the saved weights expect: ``x_norm = (x / scale − mean) / std``.

    safetensors tensors ``mean`` and ``std`` (n_voxel,) float64 and ``constant_voxels`` (k,) int64,
    with ``scale`` in the metadata, so the weights can be applied to raw fMRI of the same mask.
    """
    from safetensors.numpy import save_file

    tensors = {"mean": np.ascontiguousarray(stats["mean"], np.float64),
               "std": np.ascontiguousarray(stats["std"], np.float64),
               "constant_voxels": np.ascontiguousarray(stats["constant_voxels"], np.int64)}
    with io.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"scale": repr(float(stats["scale"])),
                                              "formula": "x_norm = (x / scale - mean) / std"})
    return path


def needs_base(ctx) -> bool:
    """A variant with the base training rows reuses the base run's predictions of the targets it
    does not change (the runner runs the base ridge first); a row subset is fitted afresh."""
    return ctx.variant != BASE_VARIANT and load_variant(ctx.layout).indices is None


def outputs(ctx) -> list[Path]:
    out = [ctx.layout.prediction(t) for t in TARGETS]
    if ctx.cfg.ridge.save_weights:
        out += [ctx.layout.ridge_weights(t) for t in TARGETS] + [normalisation_path(ctx.layout)]
    return out


def inputs(ctx) -> list[Path]:
    layout = ctx.layout
    d = layout.base.data_dir
    feats = [train_target_path(layout, t) for t in TARGETS]
    return [part_path(d, s, "fmri", ctx.subject) for s in ("train", "test")] + feats + variant_files(layout)


def main(argv=None) -> int:
    return step_main("ridge", argv)


if __name__ == "__main__":
    sys.exit(main())
