"""Step ``icnn``: the iCNN baseline (Shen, Horikawa, Majima & Kamitani 2019) on any training variant.

Three stages, each resumable and each redone only when its own settings change:

1. **VGG19 features** of every train and test image, once per subject (under the *base* run, reused
   by every variant): images squeezed to ``icnn.image_size`` (PIL bicubic), RGB→BGR, minus the Caffe
   mean, ``icnn.layers`` tapped at bdpy's ``layer_map('vgg19')`` modules (conv outputs before
   their ReLU, fc6/fc7/fc8 linear outputs). ``features/icnn/<layer>_{train,test}.npy``, float32
   ``(n_img, *unit_shape)``, plus ``reference_std.json`` (see 3).
2. **Decoding** fMRI → features with the variant's training rows. fMRI is z-scored with the training
   mean/std (ddof=1), as the lab does. Decoder: ``icnn.n_voxels = 0`` (default) uses
   :class:`regression.ridge.MultiTargetRidge` with all voxels — one eigendecomposition shared by
   all 19 layers, ~15M units streamed in column chunks; this equals the lab's FastL2LiR on z-scored
   X and Y when no voxels are selected (X and Y are centred, so the penalised intercept is 0).
   ``n_voxels > 0`` uses ``fastl2lir`` with that many voxels selected per unit (the lab's 500): more
   faithful, but one solve per unit makes it practical only for the fc layers. Raw predictions go to
   ``predictions/icnn/<layer>_test.npy`` (decoder metrics use them), the decoder's training mean
   to ``<layer>_train_mean.npy``.
3. **Reconstruction** of each test image by optimising the 4096-d input of the relu7 generator so
   that VGG19 features of the (centre-cropped) generated image match the decoded ones — the lab's
   ``recon_icnn_image_gd`` settings: SGD with momentum, linear lr/momentum/decay schedules over
   ``n_iter`` iterations, gradient divided by its mean absolute value, code decayed by
   ``(1 − decay)`` and clipped to ``[0, upper bound]`` after each step, loss
   ``Σ_l w_l ‖φ_l(x) − t_l‖²`` with ``w_l ∝ 1/‖t_l‖²`` (summing to 1). Targets are the decoded
   features scaled as the lab's ``feature_std_train_mean_center``: centre on the training mean,
   divide by the layer's mean channel-wise spatial SD (ddof=1; the SD over units for fc layers),
   multiply by the same statistic averaged over the reference images, add the training mean back.
   The lab's reference is 10,000 ImageNet images; here it is all base training images
   (``reference_std.json``), fixed across variants as the lab's is. Image ``i`` starts from
   ``N(0, 1)`` drawn with seed ``icnn.seed + i``; images are batched (``icnn.batch_size``) without
   changing any image's result. The final image is the last generated one, Caffe mean added back,
   2% of extreme values clipped at each end and min-max stretched to 0..255 (bdpy's
   ``clip_extreme(pct=4)`` + ``normalize_image``), ``images/icnn/NNNN.png`` at ``image_size`` px.

bdpy's ``bdpy.recon.torch.icnn.reconstruct`` implements the same loop for one image at a time, but
with numpy state on the host, unseeded global RNG, per-iteration printing and snapshot folders;
:func:`reconstruct` is an equivalent batched, device-resident loop (``tests/test_icnn.py`` checks it
against bdpy's result).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from models.icnn import GENERATOR_SIZE, IMAGE_MEAN_BGR, ICNNModels, load_icnn_models
from pipeline import io
from pipeline.cli import step_main
from pipeline.common_format import part_path, read_split
from pipeline.errors import UserError
from pipeline.variant import load_variant, variant_files

log = logging.getLogger("recon")

KIND = "icnn"  # images/icnn, features/icnn, predictions/icnn
STD_DDOF = 1  # as the lab's feature scaling and fMRI/feature normalisation


# --------------------------------------------------------------------------------------------
# layers and paths
# --------------------------------------------------------------------------------------------


def vgg19_layer_map() -> dict[str, str]:
    """bdpy's human-readable VGG19 layer names → module paths (``'features[0]'``), in forward order."""
    from bdpy.dl.torch.models import layer_map

    return dict(layer_map("vgg19"))


def check_layers(layers: Sequence[str]) -> list[str]:
    """Validate ``icnn.layers`` and return them in forward order (no duplicates)."""
    known = vgg19_layer_map()
    bad = [l for l in layers if l not in known]
    if bad or not layers:
        raise UserError(f"icnn.layers: unknown VGG19 layer(s) {bad or '(empty list)'}; known: {', '.join(known)}")
    order = list(known)
    return sorted(set(layers), key=order.index)


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``'features[0]'`` / ``'classifier[3]'`` → the sub-module."""
    obj = model
    for name, index in re.findall(r"([A-Za-z_]\w*)?((?:\[\d+\])*)", path.replace(".", " ")):
        if name:
            obj = getattr(obj, name)
        for i in re.findall(r"\[(\d+)\]", index):
            obj = obj[int(i)]
    return obj


def features_dir(layout) -> Path:
    return layout.base.run_dir / "features" / KIND


def feature_path(layout, layer: str, split: str) -> Path:
    """True VGG19 features of one split, shared by all variants: float32 (n_img, *unit_shape)."""
    return features_dir(layout) / f"{layer}_{split}.npy"


def predictions_dir(layout) -> Path:
    return layout.run_dir / "predictions" / KIND


def prediction_path(layout, layer: str) -> Path:
    """Decoded (unscaled) test features of ``layout``'s variant: float32 (n_test, *unit_shape)."""
    return predictions_dir(layout) / f"{layer}_test.npy"


def train_mean_path(layout, layer: str) -> Path:
    return predictions_dir(layout) / f"{layer}_train_mean.npy"


def _state_ok(path: Path, state: dict) -> bool:
    try:
        return io.load_json(path) == json.loads(json.dumps(state))
    except UserError:
        return False


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def preprocess_images(stim: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB → float32 (N, 3, size, size) Caffe input (BGR, 0..255 − mean).

    The whole image is squeezed to ``size`` × ``size`` with PIL bicubic, as the lab's extractor.
    """
    out = np.empty((len(stim), 3, size, size), dtype=np.float32)
    mean = np.asarray(IMAGE_MEAN_BGR, np.float32)[:, None, None]
    for i, img in enumerate(stim):
        pil = Image.fromarray(np.asarray(img, dtype=np.uint8))
        if pil.size != (size, size):
            pil = pil.resize((size, size), resample=Image.Resampling.BICUBIC)
        out[i] = np.asarray(pil, np.float32).transpose(2, 0, 1)[::-1] - mean
    return torch.from_numpy(out)


def deprocess_image(x: np.ndarray) -> np.ndarray:
    """Caffe-domain (3, H, W) → uint8 (H, W, 3) RGB: mean back, 2% tails clipped, stretched to 0..255."""
    from bdpy.recon.utils import clip_extreme, normalize_image

    img = (np.asarray(x, np.float32) + np.asarray(IMAGE_MEAN_BGR, np.float32)[:, None, None])[::-1]
    return normalize_image(clip_extreme(np.ascontiguousarray(img.transpose(1, 2, 0)), pct=4))


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, size, size), the centre (bdpy's top-left = (H − size) // 2)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise UserError(f"icnn.image_size = {size} exceeds the generator's {h}x{w} output")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


class FeatureTaps(contextlib.AbstractContextManager):
    """Forward hooks on the VGG19 modules of ``layers``; ``taps(x)`` → {layer: output (N, ...)}.

    Outputs keep their graph (the reconstruction differentiates through them); wrap calls in
    ``torch.no_grad()`` for extraction. Hooks are removed on exit.
    """

    def __init__(self, encoder: torch.nn.Module, layers: Sequence[str]):
        self.encoder, self.layers = encoder, list(layers)
        lm = vgg19_layer_map()
        self._out: dict[str, torch.Tensor] = {}
        self._handles = [_module(encoder, lm[l]).register_forward_hook(self._hook(l)) for l in self.layers]

    def _hook(self, layer):
        def fn(_module, _inp, out):
            self._out[layer] = out
        return fn

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        self.encoder(x)
        out, self._out = self._out, {}
        return {l: out[l] for l in self.layers}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc) -> None:
        self.close()


def feature_std(a: np.ndarray) -> np.ndarray:
    """Per-sample SD statistic the lab rescales: (N, C, H, W) → (N,) mean over C of the SD over (H, W);
    (N, D) (fc, or a 1x1 map) → (N,) SD over units. ddof = 1."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 4 and a.shape[2] * a.shape[3] > 1:
        return a.reshape(a.shape[0], a.shape[1], -1).std(axis=2, ddof=STD_DDOF).mean(axis=1)
    return a.reshape(a.shape[0], -1).std(axis=1, ddof=STD_DDOF)


def extract_features(encoder: torch.nn.Module, stim: np.ndarray, layers: Sequence[str], out: Mapping[str, np.ndarray],
                     *, size: int, batch_size: int, device: str, progress: bool = True, desc: str = "VGG19"
                     ) -> dict[str, np.ndarray]:
    """VGG19 features of uint8 images (N, H, W, 3) written into ``out[layer]`` (N, *unit_shape).

    Returns {layer: (N,) per-image :func:`feature_std`}.
    """
    stds = {l: np.empty(len(stim)) for l in layers}
    with FeatureTaps(encoder, layers) as taps, torch.no_grad():
        for s in tqdm(range(0, len(stim), batch_size), desc=desc, unit="batch", disable=not progress):
            x = preprocess_images(stim[s:s + batch_size], size).to(device)
            for layer, f in taps(x).items():
                f = f.float().cpu().numpy()
                out[layer][s:s + len(f)] = f
                stds[layer][s:s + len(f)] = feature_std(f)
    return stds


def unit_shapes(encoder: torch.nn.Module, layers: Sequence[str], size: int, device: str) -> dict[str, tuple]:
    """Feature shape (without the sample axis) of each layer for ``size`` px inputs."""
    with FeatureTaps(encoder, layers) as taps, torch.no_grad():
        return {l: tuple(f.shape[1:]) for l, f in taps(torch.zeros(1, 3, size, size, device=device)).items()}


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


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
                    n_voxels: int = 0, device: str = "cpu", max_memory_gb: float = 8.0, progress: bool = True,
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


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


def layer_weights(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: (B,)} weights ∝ 1/‖t_l‖², normalised to sum 1 over layers for each image."""
    inv = {l: 1.0 / t.detach().double().flatten(1).pow(2).sum(1) for l, t in targets.items()}
    total = sum(inv.values())
    return {l: (v / total).float() for l, v in inv.items()}


def reconstruct(targets: Mapping[str, torch.Tensor], encoder: torch.nn.Module, generator: torch.nn.Module, *,
                seeds: Sequence[int], latent_dim: int, n_iter: int = 500, image_size: int = 224,
                lr: tuple[float, float] = (2.0, 1e-10), momentum: tuple[float, float] = (0.9, 0.9),
                decay: tuple[float, float] = (0.01, 0.01), lower_bound: float | None = 0.0,
                upper_bound: np.ndarray | None = None, initial_latent: torch.Tensor | None = None,
                progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """iCNN with a deep generator prior, for a batch of independent images.

    targets: {layer: (B, *unit_shape)} on the encoder's device (forward-order layers of bdpy's
    VGG19 layer map); seeds: B ints, image b starts from ``N(0, 1)`` drawn by a CPU generator
    seeded ``seeds[b]`` (unless ``initial_latent`` (B, latent_dim) is given).
    Returns (images (B, 3, image_size, image_size) float32 Caffe domain on the CPU — the last
    generated images, whose loss is ``history[-1]`` —, history (n_iter, B) float64 losses).
    """
    layers = list(targets)
    device = next(encoder.parameters()).device
    B = len(seeds)
    if initial_latent is None:
        initial_latent = torch.stack([torch.randn(latent_dim, generator=torch.Generator().manual_seed(int(s)))
                                      for s in seeds])
    z = initial_latent.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    upper = None if upper_bound is None else torch.as_tensor(upper_bound, dtype=torch.float32, device=device)
    weights = layer_weights(targets)
    opt = torch.optim.SGD([z], lr=lr[0], momentum=momentum[0])
    history = np.zeros((n_iter, B))
    image = None
    with FeatureTaps(encoder, layers) as taps:
        for it in tqdm(range(n_iter), desc="iCNN", unit="it", leave=False, disable=not progress):
            frac = it / n_iter
            decay_it = decay[0] + frac * (decay[1] - decay[0])
            for g in opt.param_groups:
                g["lr"] = lr[0] + frac * (lr[1] - lr[0])
                g["momentum"] = momentum[0] + frac * (momentum[1] - momentum[0])
            opt.zero_grad(set_to_none=False)
            x = centre_crop(generator(z), image_size)
            feats = taps(x)
            loss = sum(weights[l] * (feats[l] - targets[l]).pow(2).flatten(1).sum(1) for l in layers)
            loss.sum().backward()
            with torch.no_grad():
                g = z.grad
                scale = g.abs().mean(dim=1, keepdim=True)
                g.div_(torch.where(scale > 0, scale, torch.ones_like(scale)))
            image = x.detach()
            opt.step()
            with torch.no_grad():
                z.mul_(1.0 - decay_it)
                if lower_bound is not None:
                    z.clamp_(min=lower_bound)
                if upper is not None:
                    torch.minimum(z, upper, out=z)
            history[it] = loss.detach().double().cpu().numpy()
    if image is None:  # n_iter = 0: the initial images
        with torch.no_grad():
            image = centre_crop(generator(z), image_size)
    return image.float().cpu(), history


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------


def _n_images(layout, split: str, subject: str) -> int:
    p = part_path(layout.base.data_dir, split, "fmri", subject)
    return int(io.load_npy(p, mmap_mode="r").shape[0])


def _digests(layout, subject, part: str) -> dict:
    """Content digests of the train/test ``part`` files (a re-prepared dataset invalidates)."""
    from pipeline.digests import DigestCache

    digests = DigestCache()  # the prepare record's digests while the files are unchanged
    return {s: digests.digest(part_path(layout.base.data_dir, s, part, subject)) for s in ("train", "test")}


def _feature_state(ctx, layers) -> dict:
    cfg, c = ctx.cfg, ctx.cfg.icnn
    return {"layers": list(layers), "image_size": c.image_size, "mean_bgr": list(IMAGE_MEAN_BGR),
            "encoder": "tiny" if cfg.run.tiny_models else c.vgg19,
            "stim": _digests(ctx.layout, ctx.subject, "stim")}


def ensure_features(ctx, encoder: torch.nn.Module, layers: list[str]) -> dict:
    """Stage 1 (base run, once per subject): true features of train/test images + reference SDs."""
    layout, c = ctx.layout, ctx.cfg.icnn
    state = _feature_state(ctx, layers)
    state_path = features_dir(layout) / "extract.json"
    files = [feature_path(layout, l, s) for l in layers for s in ("train", "test")]
    ref_path = features_dir(layout) / "reference_std.json"
    redo = ctx.force and ctx.variant == "base"
    if not redo and _state_ok(state_path, state) and ref_path.is_file() and all(p.is_file() for p in files):
        return io.load_json(ref_path)
    if state_path.exists():
        state_path.unlink()
    shapes = unit_shapes(encoder, layers, c.image_size, ctx.device)
    reference = {}
    for split in ("train", "test"):
        stim = read_split(layout.base.data_dir, split, ctx.subject, parts=("stim",)).stim
        gb = len(stim) * sum(math.prod(s) for s in shapes.values()) * 4 / 2**30
        log.info("[icnn] VGG19 features of %d %s images (%d layers, %.1f GB)", len(stim), split, len(layers), gb)
        with contextlib.ExitStack() as stack:
            out = {l: stack.enter_context(io.atomic_memmap(feature_path(layout, l, split), (len(stim),) + shapes[l],
                                                           np.float32)) for l in layers}
            stds = extract_features(encoder, stim, layers, out, size=c.image_size, batch_size=c.feature_batch_size,
                                    device=ctx.device, progress=ctx.progress, desc=f"VGG19 {split}")
        if split == "train":
            reference = {l: float(np.mean(v)) for l, v in stds.items()}
    io.save_json(ref_path, reference)
    io.save_json(state_path, state)
    return reference


def _decode_state(ctx, layers, n_train: int) -> dict:
    c = ctx.cfg.icnn
    variant = load_variant(ctx.layout, n_train)
    idx = None if variant.indices is None else _digest(variant.indices.tolist())
    feats = io.load_json(features_dir(ctx.layout) / "extract.json")
    return {"alpha": c.alpha, "n_voxels": c.n_voxels, "layers": list(layers), "indices": idx,
            "features": _digest(feats), "fmri": _digests(ctx.layout, ctx.subject, "fmri")}


def ensure_decoded(ctx, layers: list[str]) -> bool:
    """Stage 2 (per variant): decoded test features + training means. True when (re)computed."""
    from regression.ridge import normalise_fmri

    layout, c = ctx.layout, ctx.cfg.icnn
    train = read_split(layout.base.data_dir, "train", ctx.subject, parts=("fmri",))
    test = read_split(layout.base.data_dir, "test", ctx.subject, parts=("fmri",))
    state = _decode_state(ctx, layers, len(train))
    state_path = predictions_dir(layout) / "decode.json"
    files = [prediction_path(layout, l) for l in layers] + [train_mean_path(layout, l) for l in layers]
    if not ctx.force and _state_ok(state_path, state) and all(p.is_file() for p in files):
        return False
    if state_path.exists():
        state_path.unlink()
    variant = load_variant(layout, len(train))
    X = np.asarray(train.fmri)
    targets = {}
    for l in layers:
        Y = io.load_npy(feature_path(layout, l, "train"), mmap_mode="r")
        if Y.shape[0] != X.shape[0]:
            raise UserError(f"{feature_path(layout, l, 'train')}: {Y.shape[0]} rows but the training fMRI has "
                            f"{X.shape[0]} (rerun the icnn step with --force)")
        targets[l] = Y if variant.indices is None else RowSubset(Y, variant.indices)
    if variant.indices is not None:
        X = X[variant.indices]
    X, X_test, _ = normalise_fmri(X, np.asarray(test.fmri), scale=1.0)

    def save(layer):
        def fn(pred, mean):
            io.save_npy(prediction_path(layout, layer), pred)
            io.save_npy(train_mean_path(layout, layer), mean)
        return fn

    log.info("[icnn] decoding %d layers from %d training images x %d voxels (%s)", len(layers), X.shape[0],
             X.shape[1], "all voxels, MultiTargetRidge" if c.n_voxels <= 0 or c.n_voxels >= X.shape[1]
             else f"fastl2lir, {c.n_voxels} voxels per unit")
    decode_features(X, X_test, targets, alpha=c.alpha, n_voxels=c.n_voxels, device=ctx.device,
                    max_memory_gb=ctx.cfg.ridge.max_memory_gb, progress=ctx.progress,
                    out={l: save(l) for l in layers})
    io.save_json(state_path, state)
    return True


def _recon_state(ctx, layers) -> dict:
    c = ctx.cfg.icnn
    return {"decode": io.load_json(predictions_dir(ctx.layout) / "decode.json"),
            "reference": io.load_json(features_dir(ctx.layout) / "reference_std.json"),
            "n_iter": c.n_iter, "image_size": c.image_size, "lr": [c.lr_start, c.lr_end],
            "momentum": [c.momentum_start, c.momentum_end], "decay": [c.decay_start, c.decay_end],
            "seed": c.seed, "generator": "tiny" if ctx.cfg.run.tiny_models else [c.generator, c.generator_bound],
            "encoder": "tiny" if ctx.cfg.run.tiny_models else c.vgg19}


def image_paths(ctx) -> list[Path]:
    return [ctx.layout.image(KIND, i) for i in range(_n_images(ctx.layout, "test", ctx.subject))]


def reconstruct_images(ctx, models: ICNNModels, layers: list[str], reference: Mapping[str, float]) -> list[int]:
    """Stage 3: every missing test PNG (all with ``ctx.force``); returns the indices redone."""
    layout, c = ctx.layout, ctx.cfg.icnn
    state = _recon_state(ctx, layers)
    state_path = predictions_dir(layout) / "recon.json"
    paths = image_paths(ctx)
    if not _state_ok(state_path, state):  # images of other settings or predictions are stale
        for p in paths:
            p.unlink(missing_ok=True)
        io.save_json(state_path, state)
    todo = list(range(len(paths))) if ctx.force else [i for i, p in enumerate(paths) if not p.is_file()]
    if len(todo) < len(paths):
        log.info("[icnn] %d of %d images exist, reconstructing the other %d", len(paths) - len(todo), len(paths),
                 len(todo))
    if not todo:
        return []
    preds = {l: io.load_npy(prediction_path(layout, l), mmap_mode="r") for l in layers}
    means = {l: io.load_npy(train_mean_path(layout, l)) for l in layers}
    bar = tqdm(total=len(todo), desc=f"iCNN sub{ctx.subject}/{ctx.variant}", unit="img", disable=not ctx.progress)
    for s in range(0, len(todo), max(1, c.batch_size)):
        idx = todo[s:s + max(1, c.batch_size)]
        targets = {l: torch.from_numpy(np.stack([scale_decoded(preds[l][i], means[l], reference[l]) for i in idx]))
                   .to(ctx.device) for l in layers}
        images, hist = reconstruct(
            targets, models.encoder, models.generator, seeds=[c.seed + i for i in idx], latent_dim=models.latent_dim,
            n_iter=c.n_iter, image_size=c.image_size, lr=(c.lr_start, c.lr_end),
            momentum=(c.momentum_start, c.momentum_end), decay=(c.decay_start, c.decay_end),
            lower_bound=models.lower_bound, upper_bound=models.upper_bound, progress=ctx.progress)
        for b, i in enumerate(idx):
            io.save_image(paths[i], deprocess_image(images[b].numpy()))
        if len(hist):
            log.debug("[icnn] images %s: loss %s → %s", idx, hist[0].round(4), hist[-1].round(4))
        bar.update(len(idx))
    bar.close()
    return todo


def run(ctx) -> None:
    c = ctx.cfg.icnn
    layers = check_layers(c.layers)
    if c.n_iter < 0 or c.batch_size < 1 or c.feature_batch_size < 1:
        raise UserError(f"icnn: n_iter must be >= 0 and batch sizes >= 1 (got {c.n_iter}, {c.batch_size}, "
                        f"{c.feature_batch_size})")
    if not 0 < c.image_size <= GENERATOR_SIZE:
        raise UserError(f"icnn.image_size = {c.image_size}: must be in 1..{GENERATOR_SIZE} (the generator's output)")
    models = load_icnn_models(ctx.cfg, ctx.device)  # missing weights fail before any long work
    reference = ensure_features(ctx, models.encoder, layers)
    ensure_decoded(ctx, layers)
    reconstruct_images(ctx, models, layers, reference)


def outputs(ctx) -> list[Path]:
    layers = check_layers(ctx.cfg.icnn.layers)
    return ([feature_path(ctx.layout, l, s) for l in layers for s in ("train", "test")]
            + [prediction_path(ctx.layout, l) for l in layers] + image_paths(ctx))


def inputs(ctx) -> list[Path]:
    d = ctx.layout.base.data_dir
    return ([part_path(d, s, p, ctx.subject) for s in ("train", "test") for p in ("fmri", "stim")]
            + variant_files(ctx.layout))


def main(argv=None) -> int:
    return step_main(KIND, argv)


if __name__ == "__main__":
    sys.exit(main())
