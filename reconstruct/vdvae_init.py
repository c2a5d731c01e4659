"""Step 4, ``vdvae_init``: decode the predicted VDVAE latents into the blurry "initial guess".

Groups 0..K−1 take the predicted latents, the remaining groups sample the prior at temperature 1,
pixels are drawn from the mixture-of-logistics head (``pixels = "mean"``: its average); the 64×64
result is upsampled to 512×512 with PIL bicubic (method.md §2.4). Image i uses seed
``vdvae_init.seed + i``, so any image can be regenerated alone; a rerun of the same run makes only
the missing PNGs (``pipeline.resume``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from models import load as load_models
from pipeline import io
from pipeline.seeds import per_image
from pipeline.step_entry import step_main
from pipeline.errors import UserError
from pipeline.resume import pending


def run(ctx) -> None:
    from models.vdvae import decode_latents, latent_dim

    c = ctx.cfg.vdvae_init
    latents = io.load_npy(ctx.layout.prediction("vdvae"), mmap_mode="r")
    model = load_models.vdvae(ctx.cfg, ctx.device)
    n_groups = ctx.cfg.features.vdvae_groups
    expected = latent_dim(model.config, n_groups)
    if latents.ndim != 2 or latents.shape[1] != expected:
        raise UserError(f"{ctx.layout.prediction('vdvae')}: shape {latents.shape}, expected (n_test, {expected}) "
                        f"for {n_groups} VDVAE groups")
    paths = [ctx.layout.image("vdvae", i) for i in range(latents.shape[0])]
    todo = pending(paths, ctx.resume, "vdvae_init", "decoding")
    for start in range(0, len(todo), c.batch_size):
        idx = todo[start:start + c.batch_size]
        images = decode_latents(model, np.asarray(latents[idx]), n_groups=n_groups, batch_size=c.batch_size,
                                seeds=per_image(c.seed, idx), progress=False, pixels=c.pixels)
        for i, img in zip(idx, images):
            pil = Image.fromarray(img)
            if c.output_size != pil.width:
                pil = pil.resize((c.output_size, c.output_size), resample=Image.Resampling.BICUBIC)
            io.save_image(paths[i], pil)


def outputs(ctx) -> list[Path]:
    n = io.load_npy(ctx.layout.prediction("vdvae"), mmap_mode="r").shape[0]
    return [ctx.layout.image("vdvae", i) for i in range(n)]


def inputs(ctx) -> list[Path]:
    return [ctx.layout.prediction("vdvae")]


def main(argv=None) -> int:
    return step_main("vdvae_init", argv)


if __name__ == "__main__":
    sys.exit(main())
