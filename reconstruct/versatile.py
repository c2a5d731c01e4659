"""Step 5, ``versatile``: Versatile Diffusion img2img from the VDVAE init images, guided by the
predicted CLIP-vision and CLIP-text embeddings (method.md §5; every constant is a config field).

1. load the init images (512 px PNGs of ``vdvae_init``) and the predicted embeddings
2. pick the conditioning: predicted, or an ablation/control (``use_clip_*``, ``text_features``)
3. unconditional pair: embedding of the empty text and of a uniform gray image
4. ``reconstruct.sampling.img2img`` in batches: strength 0.75 of 50 DDIM steps, guidance 7.5,
   vision 0.6 / text 0.4 dual attention
5. write one PNG per test image as soon as its batch is done; a rerun makes only the missing ones

Image i draws its noise from a generator seeded with ``versatile.seed + i``: results do not depend
on batch size or on which images ran before. ``versatile.reference_rng = true`` instead replays the
reference's single ``torch.manual_seed(seed)`` stream, image after image (then a resume redoes all).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from models import load as load_models
from pipeline import io
from pipeline.seeds import per_image
from pipeline.step_entry import step_main
from pipeline.errors import UserError
from pipeline.resume import pending

TEXT_FEATURES = ("predicted", "true", "shuffled")


def load_init_images(paths: list[Path], size: int | None = None) -> np.ndarray:
    """(N, S, S, 3) uint8 from PNGs; resized with PIL bicubic to ``size`` when given (``regularize_image``)."""
    out = []
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: init image not found (run the vdvae_init step)")
        try:
            img = Image.open(p).convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{p}: not a readable image ({' '.join(str(exc).split())}); delete it and rerun "
                            "vdvae_init") from None
        if size and img.size != (size, size):
            img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)


WITHOUT_VDVAE = ("random_latent", "noise_image")
CLIP_ABLATIONS = ("mixing", "unconditional")


def ablation_mix_text(v) -> float:
    """The text share of the dual attention after the CLIP ablations.

    ``clip_ablation = "mixing"`` (default; the reference script's ``-mix_str`` switch): "w/o CLIP-Text"
    runs the vision transformers only (mix_text 0), "w/o CLIP-Vision" the text ones only (mix_text 1).
    ``"unconditional"`` keeps the configured mixing and replaces the embedding by the unconditional one
    (see :func:`conditioning`).
    """
    if v.clip_ablation not in CLIP_ABLATIONS:
        raise UserError(f"versatile.clip_ablation = {v.clip_ablation!r}: expected one of {', '.join(CLIP_ABLATIONS)}")
    if v.clip_ablation == "unconditional" or (v.use_clip_text and v.use_clip_vision):
        return v.mix_text
    if not v.use_clip_text and not v.use_clip_vision:
        raise UserError("versatile.use_clip_text and use_clip_vision are both false: with clip_ablation = 'mixing' "
                        "nothing would guide the image; use clip_ablation = 'unconditional' for that control")
    return 0.0 if not v.use_clip_text else 1.0


def random_init_latents(seed: int, indices, shape: tuple[int, ...]) -> np.ndarray:
    """The paper's "w/o VDVAE": a standard-normal AutoKL latent (diffusion space) per image, seeded [seed, i]."""
    return np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape, dtype=np.float32) for i in indices])


def conditioning(ctx, clip) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """(vision_cond, text_cond, vision_uncond, text_uncond) after the configured controls."""
    v, layout = ctx.cfg.versatile, ctx.layout
    if v.text_features not in TEXT_FEATURES:
        raise UserError(f"versatile.text_features = {v.text_features!r}: expected one of {', '.join(TEXT_FEATURES)}")
    vision = io.load_npy(layout.prediction("clipvision"))
    text = io.load_npy(layout.prediction("cliptext"))
    if v.text_features == "true":  # "usetruecliptext": the test images' own CLIP-text features
        text = io.load_npy(layout.base.features("cliptext", "test"))
    elif v.text_features == "shuffled":  # "badshuffle": predicted features shuffled element-wise
        from ai_captions.shuffle import shuffle_elements

        text = shuffle_elements(text, v.seed)
    text_uncond = clip.unconditional_text()
    vision_uncond = clip.unconditional_image()
    if v.clip_ablation == "unconditional":  # the named alternative: the unconditional embedding as condition
        if not v.use_clip_text:
            text = np.broadcast_to(np.asarray(text_uncond.cpu()), text.shape)
        if not v.use_clip_vision:
            vision = np.broadcast_to(np.asarray(vision_uncond.cpu()), vision.shape)
    if len(vision) != len(text):
        raise UserError(f"{layout.prediction('clipvision')}: {len(vision)} rows but CLIP-text has {len(text)}")
    return vision, text, vision_uncond, text_uncond


def run(ctx) -> None:
    from reconstruct.sampling import BrainDiffuserRNG, img2img

    v, layout = ctx.cfg.versatile, ctx.layout
    if not 0.0 <= v.strength <= 1.0 or not 0.0 <= v.mix_text <= 1.0:
        raise UserError(f"versatile.strength ({v.strength}) and versatile.mix_text ({v.mix_text}) must lie in [0, 1]")
    if v.without_vdvae not in WITHOUT_VDVAE:
        raise UserError(f"versatile.without_vdvae = {v.without_vdvae!r}: expected one of {', '.join(WITHOUT_VDVAE)}")
    mix_text = ablation_mix_text(v)
    on_gpu = str(ctx.device).startswith("cuda")
    dtype = torch.float16 if (v.fp16 and on_gpu) else torch.float32
    clip = load_models.clip(ctx.cfg, ctx.device)
    vision, text, vision_uncond, text_uncond = conditioning(ctx, clip)
    del clip
    n = len(vision)
    paths = [layout.image("versatile", i) for i in range(n)]
    todo = pending(paths, ctx.resume and not v.reference_rng, "versatile", "generating")
    if not todo:
        return
    init_paths = [layout.image("vdvae", i) for i in range(n)]
    components = load_models.versatile(ctx.cfg, ctx.device, dtype)
    reference = BrainDiffuserRNG(v.seed, ctx.device) if v.reference_rng else None
    bar = tqdm(total=len(todo), desc=f"versatile sub{ctx.subject}", unit="img", disable=not ctx.progress)
    for start in range(0, len(todo), v.batch_size):
        idx = todo[start:start + v.batch_size]
        init, latents = None, None
        size = ctx.cfg.vdvae_init.output_size
        if v.use_vdvae_init:
            init = load_init_images([init_paths[i] for i in idx])
        elif v.without_vdvae == "random_latent":  # "w/o VDVAE" (paper): a seeded random AutoKL latent
            f = components.vae_scale_factor
            latents = random_init_latents(v.seed, idx, (components.vae.config.latent_channels, size // f, size // f))
        else:  # "noise_image": a seeded random-pixel image encoded through AutoKL (~25 % survives strength 0.75)
            init = np.stack([np.random.default_rng([v.seed, i]).integers(0, 256, (size, size, 3), dtype=np.uint8)
                             for i in idx])
        generators = None if reference else [torch.Generator("cpu").manual_seed(s) for s in per_image(v.seed, idx)]
        images = img2img(components, init, vision[idx], text[idx], vision_uncond, text_uncond,
                         strength=v.strength, num_inference_steps=v.num_inference_steps,
                         guidance_scale=v.guidance_scale, mix_text=mix_text, generators=generators,
                         reference_rng=reference, reference_offset=v.reference_offset, batch_size=v.batch_size,
                         progress=False, init_latents=latents)
        for i, img in zip(idx, images):
            io.save_image(paths[i], img)
        bar.update(len(idx))
    bar.close()


def outputs(ctx) -> list[Path]:
    n = io.load_npy(ctx.layout.prediction("clipvision"), mmap_mode="r").shape[0]
    return [ctx.layout.image("versatile", i) for i in range(n)]


def inputs(ctx) -> list[Path]:
    layout = ctx.layout
    out = [layout.prediction("clipvision"), layout.prediction("cliptext")]
    if ctx.cfg.versatile.use_vdvae_init:
        out.append(layout.images("vdvae"))
    if ctx.cfg.versatile.text_features == "true":
        out.append(layout.base.features("cliptext", "test"))
    return out


def main(argv=None) -> int:
    return step_main("versatile", argv)


if __name__ == "__main__":
    sys.exit(main())
