"""The trained miniature Brain-Diffuser: tiny instances of the real architectures, trained on the
synthetic image distribution (``make demo-models``, the ``miniature`` package), committed under
``miniature/weights/``. Its architectures and loaders live here with the other models, so that
``models.load`` needs nothing outside ``models/`` and ``pipeline/``.

Model modes (``models.mode``): ``"real"`` loads the published weights from ``weights_dir``;
``"trained-miniature"`` (the demo) loads the networks below from the committed safetensors;
``"random-tiny"`` builds seeded random tiny networks (unit tests that need no learning).

Networks (architectures fixed here, weights from ``miniature.train``):

* VDVAE: :meth:`models.vdvae.VDVAEConfig.miniature` (ELBO with the DMoL likelihood);
* CLIP text + vision towers: transformers' CLIP classes at the tiny width of
  :meth:`models.clip.CLIPEmbedder.tiny` (contrastive on image-caption pairs);
* AutoencoderKL (diffusers, 4x down-sampling: 16x16 latents) and the Versatile Diffusion image UNet with dual
  vision/text attention (conditional denoiser with condition dropout, VD's noise schedule).

The evaluation networks and the iCNN VGG19/generator stay seeded random in both tiny modes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "miniature" / "weights"
MANIFEST = "manifest.json"
FILES = {
    "vdvae": "vdvae.safetensors",
    "clip_text": "clip_text.safetensors",
    "clip_vision": "clip_vision.safetensors",
    "vae": "vae.safetensors",
    "image_unet": "image_unet.safetensors",
}
REBUILD = "make demo-models"
ARCH_SEED = 0  # only fixes the throw-away initial values; every tensor is then loaded


# --------------------------------------------------------------------------- architectures
def build_vdvae():
    from models import vdvae as m

    return m.VDVAE(m.VDVAEConfig.miniature())


def build_clip(seed: int = ARCH_SEED):
    from models.clip import CLIPEmbedder

    return CLIPEmbedder.tiny(seed=seed)


def build_versatile(seed: int = ARCH_SEED):
    from models.versatile import tiny_versatile

    return tiny_versatile(seed=seed, vae_channels=VAE_CHANNELS, norm_groups=NORM_GROUPS, unet_channels=UNET_CHANNELS,
                          unet_cross_attention=UNET_CROSS_ATTENTION)


#: AutoencoderKL of the miniature: three levels, 4x down-sampling, so 64 px images give 16x16
#: latents. SD's kl-f8 gives 64x64 latents at 512 px; at 64 px an 8x down-sampling left an 8x8
#: latent in which a circle and a square of the same colour and place differ by a tenth of the
#: latent's spread, and the UNet drew the average of the shapes.
VAE_CHANNELS = (16, 32, 32)
#: Width per level of the dual UNet (the unit tests' random one: 32, 64, at 8x8): 16x16, 8x8, 4x4.
UNET_CHANNELS = (32, 64, 128)
#: Dual attention at the 8x8 level and in the mid block (4x4) only, the 16x16 level being
#: convolutions: attention at 16x16 would double the training step's cost.
UNET_CROSS_ATTENTION = (False, True, False)
#: GroupNorm groups of the miniature VAE and UNet: 4 channels per group at the VAE's first level (SD: 4 of 128).
NORM_GROUPS = 4


# --------------------------------------------------------------------------- loading
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: miniature weights not found; rebuild them with `{REBUILD}` "
                        f"(or use models.mode = \"random-tiny\")")
    return json.loads(path.read_text())


def _state(name: str, weights_dir: Path = WEIGHTS_DIR, verify: bool = True) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    manifest = read_manifest(weights_dir)
    path = Path(weights_dir) / FILES[name]
    if not path.is_file():
        raise UserError(f"{path}: miniature weight file missing; rebuild with `{REBUILD}`")
    want = manifest["files"][FILES[name]]["sha256"]
    if verify and _sha256(path) != want:
        raise UserError(f"{path}: sha256 does not match {MANIFEST} (corrupt, a git-lfs pointer, or from another "
                        f"training run); rebuild with `{REBUILD}` or check out the committed file")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"miniature {what}: weights do not match the architecture (missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); rebuild with `{REBUILD}`")


def load_vdvae(device="cpu", weights_dir: Path = WEIGHTS_DIR):
    model = build_vdvae()
    _load_strict(model, _state("vdvae", weights_dir), "VDVAE")
    return model.to(device).eval().requires_grad_(False)


def load_clip(device="cpu", weights_dir: Path = WEIGHTS_DIR):
    clip = build_clip()
    _load_strict(clip.text_model, _state("clip_text", weights_dir), "CLIP text tower")
    _load_strict(clip.vision_model, _state("clip_vision", weights_dir), "CLIP vision tower")
    return clip.to(device)


def load_versatile(device="cpu", dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR):
    comps = build_versatile()
    comps.text_unet = None  # its transformers live in the dual blocks; the rest is unused
    _load_strict(comps.vae, _state("vae", weights_dir), "AutoencoderKL")
    _load_strict(comps.image_unet, _state("image_unet", weights_dir), "image UNet")
    comps.vae.register_to_config(scaling_factor=float(read_manifest(weights_dir)["vae_scaling_factor"]))
    comps.vae.to(device).eval().requires_grad_(False)
    comps.image_unet.to(device=device, **({"dtype": dtype} if dtype != torch.float32 else {})).eval()
    comps.image_unet.requires_grad_(False)
    return comps
