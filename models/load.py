"""One place that turns the config into models: real weights from ``weights_dir``, or tiny
seeded random networks of the same architectures when ``run.tiny_models`` is set (demo, tests).

Tiny models are rebuilt identically from the seed in every step, so the VDVAE that encodes the
training images in ``features`` is the one that decodes predictions in ``vdvae_init``.
"""
from __future__ import annotations

import torch

from pipeline.config import Config

TINY_SEED = 1234


def vdvae(cfg: Config, device: str = "cpu"):
    from models import vdvae as m

    if cfg.run.tiny_models:
        model = m.random_init_(m.VDVAE(m.VDVAEConfig.tiny()), seed=TINY_SEED)
        return model.to(device).eval().requires_grad_(False)
    return m.load_vdvae(cfg.resolve_path(cfg.models.vdvae, "weights_dir"), device=device)


def clip(cfg: Config, device: str = "cpu"):
    from models.clip import CLIPEmbedder

    if cfg.run.tiny_models:
        return CLIPEmbedder.tiny(seed=TINY_SEED).to(device)
    return CLIPEmbedder.from_pretrained(cfg.resolve_path(cfg.models.clip, "weights_dir"), device=device)


def versatile(cfg: Config, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from models import versatile as m

    if cfg.run.tiny_models:
        components = m.tiny_versatile(seed=TINY_SEED)
        components.image_unet.to(device=device, **({"dtype": dtype} if dtype != torch.float32 else {}))
        components.vae.to(device=device)
        return components
    return m.load_versatile(cfg.resolve_path(cfg.models.versatile, "weights_dir"), device=device, dtype=dtype)
