"""One place that turns the config into models, by ``models.mode``:

* ``"real"``: the published weights from ``weights_dir``;
* ``"trained-miniature"``: the committed tiny networks trained on the synthetic images
  (``miniature/weights``, rebuilt by ``make demo-models``; the demo's default);
* ``"random-tiny"``: tiny seeded random networks of the same architectures (unit tests that need
  no learning). They are rebuilt identically from the seed in every step, so the VDVAE that
  encodes the training images in ``features`` is the one that decodes predictions in ``vdvae_init``.
"""
from __future__ import annotations

import torch

from pipeline.config import Config

TINY_SEED = 1234


def mode(cfg: Config) -> str:
    """The effective model mode (a Config built in code may still set only ``run.tiny_models``)."""
    if cfg.models.mode == "real" and cfg.run.tiny_models:
        return "random-tiny"
    return cfg.models.mode


def _miniature_dir(cfg: Config):
    from models import miniature

    return cfg.resolve_path(cfg.models.miniature) if cfg.models.miniature else miniature.WEIGHTS_DIR


def vdvae(cfg: Config, device: str = "cpu"):
    from models import vdvae as m

    if mode(cfg) == "trained-miniature":
        from models import miniature

        return miniature.load_vdvae(device, _miniature_dir(cfg))
    if mode(cfg) == "random-tiny":
        model = m.random_init_(m.VDVAE(m.VDVAEConfig.tiny()), seed=TINY_SEED)
        return model.to(device).eval().requires_grad_(False)
    return m.load_vdvae(cfg.resolve_path(cfg.models.vdvae, "weights_dir"), device=device)


def clip(cfg: Config, device: str = "cpu"):
    from models.clip import CLIPEmbedder

    if mode(cfg) == "trained-miniature":
        from models import miniature

        return miniature.load_clip(device, _miniature_dir(cfg))
    if mode(cfg) == "random-tiny":
        return CLIPEmbedder.tiny(seed=TINY_SEED).to(device)
    return CLIPEmbedder.from_pretrained(cfg.resolve_path(cfg.models.clip, "weights_dir"), device=device)


def versatile(cfg: Config, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from models import versatile as m

    if mode(cfg) == "trained-miniature":
        from models import miniature

        return miniature.load_versatile(device, dtype, _miniature_dir(cfg))
    if mode(cfg) == "random-tiny":
        components = m.tiny_versatile(seed=TINY_SEED)
        components.image_unet.to(device=device, **({"dtype": dtype} if dtype != torch.float32 else {}))
        components.vae.to(device=device)
        return components
    return m.load_versatile(cfg.resolve_path(cfg.models.versatile, "weights_dir"), device=device, dtype=dtype)
