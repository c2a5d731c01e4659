"""Step ``icnn_recon`` (iCNN stage 3, per variant): each test image by optimising the relu7 generator's input.

The 4096-d input of the relu7 generator is optimised so that VGG19 features of the (centre-cropped)
generated image match the decoded ones — the lab's ``recon_icnn_image_gd`` settings: SGD with
momentum, linear lr/momentum/decay schedules over ``n_iter`` iterations, gradient divided by its mean
absolute value, code decayed by ``(1 − decay)`` and clipped to ``[0, upper bound]`` after each step,
loss ``Σ_l w_l ‖φ_l(x) − t_l‖²`` with ``w_l ∝ 1/‖t_l‖²`` (summing to 1). Targets are the decoded
features scaled as the lab's ``feature_std_train_mean_center``
(:func:`reconstruct.icnn.decode.scale_decoded`, reference statistic from ``icnn_features``). Image
``i`` starts from ``N(0, 1)`` drawn with seed ``icnn.seed + i``; images are batched
(``icnn.batch_size``) without changing any image's result, and a rerun of the same run makes only the
missing ones (``pipeline.resume``). The final image is the last generated one, Caffe mean added back,
2% of extreme values clipped at each end and min-max stretched to 0..255 (bdpy's
``clip_extreme(pct=4)`` + ``normalize_image``), ``images/icnn/NNNN.png`` at ``image_size`` px.

bdpy's ``bdpy.recon.torch.icnn.reconstruct`` implements the same loop for one image at a time, but
with numpy state on the host, unseeded global RNG, per-iteration printing and snapshot folders;
:func:`reconstruct` is an equivalent batched, device-resident loop (``tests/test_icnn.py`` checks it
against bdpy's result).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from models.icnn import ICNNModels, load_icnn_models
from pipeline import io
from pipeline.config import ICNNConfig
from pipeline.resume import pending
from pipeline.seeds import per_image
from reconstruct.icnn.common import FeatureTaps, centre_crop, check_settings, deprocess_image, image_paths
from reconstruct.icnn.decode import scale_decoded

log = logging.getLogger("recon")
STEP = "icnn_recon"
_DEFAULTS = ICNNConfig()  # the loop's keyword defaults are the config's, declared there once


def layer_weights(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: (B,)} weights ∝ 1/‖t_l‖², normalised to sum 1 over layers for each image."""
    inv = {l: 1.0 / t.detach().double().flatten(1).pow(2).sum(1) for l, t in targets.items()}
    total = sum(inv.values())
    return {l: (v / total).float() for l, v in inv.items()}


def reconstruct(targets: Mapping[str, torch.Tensor], encoder: torch.nn.Module, generator: torch.nn.Module, *,
                seeds: Sequence[int], latent_dim: int, n_iter: int = _DEFAULTS.n_iter,
                image_size: int = _DEFAULTS.image_size, lr: tuple[float, float] = (_DEFAULTS.lr_start, _DEFAULTS.lr_end),
                momentum: tuple[float, float] = (_DEFAULTS.momentum_start, _DEFAULTS.momentum_end),
                decay: tuple[float, float] = (_DEFAULTS.decay_start, _DEFAULTS.decay_end),
                lower_bound: float | None = 0.0,
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


def reconstruct_images(ctx, models: ICNNModels, layers: list[str], reference: Mapping[str, float]) -> list[int]:
    """Every test PNG to make (the missing ones when ``ctx.resume``, else all); returns the indices made."""
    layout, c = ctx.layout, ctx.cfg.icnn
    paths = image_paths(ctx)
    todo = pending(paths, ctx.resume, "icnn", "reconstructing")
    if not todo:
        return []
    preds = {l: io.load_npy(layout.icnn_prediction(l), mmap_mode="r") for l in layers}
    means = {l: io.load_npy(layout.icnn_train_mean(l)) for l in layers}
    bar = tqdm(total=len(todo), desc=f"iCNN sub{ctx.subject}/{ctx.variant}", unit="img", disable=not ctx.progress)
    for s in range(0, len(todo), max(1, c.batch_size)):
        idx = todo[s:s + max(1, c.batch_size)]
        targets = {l: torch.from_numpy(np.stack([scale_decoded(preds[l][i], means[l], reference[l]) for i in idx]))
                   .to(ctx.device) for l in layers}
        images, hist = reconstruct(
            targets, models.encoder, models.generator, seeds=per_image(c.seed, idx), latent_dim=models.latent_dim,
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
    layers = check_settings(ctx.cfg)
    models = load_icnn_models(ctx.cfg, ctx.device)
    reconstruct_images(ctx, models, layers, io.load_json(ctx.layout.icnn_reference_std()))


def outputs(ctx) -> list[Path]:
    return image_paths(ctx)


def inputs(ctx) -> list[Path]:
    layout, layers = ctx.layout, check_settings(ctx.cfg)
    return ([layout.icnn_prediction(l) for l in layers] + [layout.icnn_train_mean(l) for l in layers]
            + [layout.icnn_reference_std()])


def main(argv=None) -> int:
    from pipeline.step_entry import step_main

    return step_main(STEP, argv)


if __name__ == "__main__":
    sys.exit(main())
