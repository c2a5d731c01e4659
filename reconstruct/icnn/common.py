"""What every iCNN stage shares: the VGG19 layer names, the Caffe image domain, feature taps and the
feature SD statistic, the settings check and the test images' paths.
"""
from __future__ import annotations

import contextlib
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from models.icnn import GENERATOR_SIZE, IMAGE_MEAN_BGR
from pipeline import io
from pipeline.common_format import part_path
from pipeline.errors import UserError
from pipeline.layout import ICNN as KIND  # images/icnn, features/icnn, predictions/icnn

STD_DDOF = 1  # as the lab's feature scaling and fMRI/feature normalisation
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------
# layers and settings
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


# --------------------------------------------------------------------------------------------
# images and features
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


def unit_shapes(encoder: torch.nn.Module, layers: Sequence[str], size: int, device: str) -> dict[str, tuple]:
    """Feature shape (without the sample axis) of each layer for ``size`` px inputs."""
    with FeatureTaps(encoder, layers) as taps, torch.no_grad():
        return {l: tuple(f.shape[1:]) for l, f in taps(torch.zeros(1, 3, size, size, device=device)).items()}


def check_settings(cfg) -> list[str]:
    """Validate the ``[icnn]`` settings every stage reads; returns the layers in forward order."""
    c = cfg.icnn
    layers = check_layers(c.layers)
    if c.n_iter < 0 or c.batch_size < 1 or c.feature_batch_size < 1:
        raise UserError(f"icnn: n_iter must be >= 0 and batch sizes >= 1 (got {c.n_iter}, {c.batch_size}, "
                        f"{c.feature_batch_size})")
    if not 0 < c.image_size <= GENERATOR_SIZE:
        raise UserError(f"icnn.image_size = {c.image_size}: must be in 1..{GENERATOR_SIZE} (the generator's output)")
    return layers


def n_images(layout, split: str) -> int:
    """Rows of the subject's ``split`` fMRI (= images of that split)."""
    p = part_path(layout.base.data_dir, split, "fmri", layout.subject)
    return int(io.load_npy(p, mmap_mode="r").shape[0])


def image_paths(ctx) -> list:
    """``images/icnn/NNNN.png`` of every test image of ``ctx``'s run."""
    return [ctx.layout.image(KIND, i) for i in range(n_images(ctx.layout, "test"))]
