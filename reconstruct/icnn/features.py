"""Step ``icnn_features`` (iCNN stage 1): VGG19 features of every train and test image, once per subject.

Written under the *base* run and reused by every variant (its completion record lives there too,
the registry's ``per_variant=False``): images squeezed to ``icnn.image_size`` (PIL bicubic), RGB→BGR,
minus the Caffe mean, ``icnn.layers`` tapped at bdpy's ``layer_map('vgg19')`` modules (conv outputs
before their ReLU, fc6/fc7/fc8 linear outputs). ``features/icnn/<layer>_{train,test}.npy``, float32
``(n_img, *unit_shape)``, plus ``reference_std.json``: per layer, the mean over the training images of
:func:`~reconstruct.icnn.common.feature_std`, the reference statistic of the reconstruction's feature
scaling (the lab's is 10,000 ImageNet images; here all base training images, fixed across variants as
the lab's is).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from models.icnn import load_encoder
from pipeline import io
from pipeline.common_format import part_path, read_split
from reconstruct.icnn.common import SPLITS, FeatureTaps, check_settings, feature_std, preprocess_images, unit_shapes

log = logging.getLogger("recon")
STEP = "icnn_features"


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


def run(ctx) -> None:
    layers = check_settings(ctx.cfg)
    layout, c = ctx.layout, ctx.cfg.icnn
    encoder = load_encoder(ctx.cfg, ctx.device)
    shapes = unit_shapes(encoder, layers, c.image_size, ctx.device)
    reference = {}
    for split in SPLITS:
        stim = read_split(layout.base.data_dir, split, ctx.subject, parts=("stim",)).stim
        gb = len(stim) * sum(math.prod(s) for s in shapes.values()) * 4 / 2**30
        log.info("[icnn] VGG19 features of %d %s images (%d layers, %.1f GB)", len(stim), split, len(layers), gb)
        with contextlib.ExitStack() as stack:
            out = {l: stack.enter_context(io.atomic_memmap(layout.icnn_features(l, split), (len(stim),) + shapes[l],
                                                           np.float32)) for l in layers}
            stds = extract_features(encoder, stim, layers, out, size=c.image_size, batch_size=c.feature_batch_size,
                                    device=ctx.device, progress=ctx.progress, desc=f"VGG19 {split}")
        if split == "train":
            reference = {l: float(np.mean(v)) for l, v in stds.items()}
    io.save_json(layout.icnn_reference_std(), reference)


def outputs(ctx) -> list[Path]:
    layers = check_settings(ctx.cfg)
    return [ctx.layout.icnn_features(l, s) for l in layers for s in SPLITS] + [ctx.layout.icnn_reference_std()]


def inputs(ctx) -> list[Path]:
    return [part_path(ctx.layout.base.data_dir, s, "stim", ctx.subject) for s in SPLITS]


def main(argv=None) -> int:
    from pipeline.step_entry import step_main

    return step_main(STEP, argv)


if __name__ == "__main__":
    sys.exit(main())
