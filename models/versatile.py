"""Versatile Diffusion through diffusers: the dual-guided network Brain-Diffuser samples from, loaded and saved.

Brain-Diffuser (method.md §5) runs Versatile Diffusion's image UNet with, at every cross-attention
slot, both the image-UNet transformer (fed CLIP-vision tokens) and the text-UNet transformer (fed
CLIP-text tokens), mixing their residuals 0.6 / 0.4. diffusers expresses the same network as a
``UNet2DConditionModel`` whose attention blocks are ``DualTransformer2DModel``s; this module builds
that network from a diffusers-format folder (the layout of HF ``shi-labs/versatile-diffusion``). The
img2img loop and Brain-Diffuser's schedule arithmetic are the sampler's (``reconstruct.sampling``).

Layout read and written here (one diffusers ``save_pretrained`` folder per component)::

    <path>/vae/          AutoencoderKL
    <path>/image_unet/   UNet2DConditionModel (plain, or already dual: config dual_cross_attention)
    <path>/text_unet/    UNetFlatConditionModel (needed only when image_unet is plain)
    <path>/scheduler/    scheduler config (only its beta schedule is used)
"""
from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models import DualTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.pipelines.deprecated.versatile_diffusion import UNetFlatConditionModel

# --------------------------------------------------------------------------- constants (method.md §5)
VD_BETA_START = 0.00085
VD_BETA_END = 0.012
VD_NUM_TRAIN_TIMESTEPS = 1000
VD_SCALING_FACTOR = 0.18215
WEIGHTS_HINT = (
    "run `make weights` (downloads Versatile Diffusion in diffusers format, HF shi-labs/versatile-diffusion) "
    "or point weights_dir at a folder with vae/, image_unet/, text_unet/, scheduler/"
)


# --------------------------------------------------------------------------- compatibility patch
_ORIGINAL_DUAL_FORWARD = DualTransformer2DModel.forward


def _dual_forward_accepting_mask(self, hidden_states, encoder_hidden_states, *args,
                                 encoder_attention_mask=None, **kwargs):
    """DualTransformer2DModel.forward that accepts the ``encoder_attention_mask`` the UNet blocks pass.

    The UNet always passes it (None unless the caller gives a mask); a real mask cannot be honoured
    by the dual transformer, so it is refused rather than silently dropped.
    """
    if encoder_attention_mask is not None:
        raise NotImplementedError("DualTransformer2DModel cannot apply an encoder_attention_mask")
    return _ORIGINAL_DUAL_FORWARD(self, hidden_states, encoder_hidden_states, *args, **kwargs)


def apply_dual_transformer_patch() -> None:
    """Make diffusers' dual-guided UNet runnable (idempotent; a no-op once diffusers is fixed).

    Since diffusers 0.17 the cross-attention UNet blocks call their transformer with
    ``encoder_attention_mask=``, which ``DualTransformer2DModel.forward`` does not accept
    (diffusers issue #13651), so any dual UNet forward raises TypeError. This is the only place
    in the project that patches diffusers; every entry point of this module calls it.
    """
    if DualTransformer2DModel.forward is _dual_forward_accepting_mask:
        return
    if "encoder_attention_mask" in inspect.signature(DualTransformer2DModel.forward).parameters:
        return  # fixed upstream
    DualTransformer2DModel.forward = _dual_forward_accepting_mask


# --------------------------------------------------------------------------- components
@dataclass
class VersatileComponents:
    """The parts of Versatile Diffusion that image reconstruction needs.

    ``image_unet`` already holds DualTransformer2DModel blocks: ``transformers[0]`` is the image
    UNet's transformer (vision context), ``transformers[1]`` the text UNet's (text context).
    ``text_unet`` is kept only when the components must be saved in the plain upstream layout.
    """

    vae: AutoencoderKL
    image_unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    text_unet: UNetFlatConditionModel | None = None

    @property
    def device(self) -> torch.device:
        return self.image_unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def vd_scheduler(**overrides) -> DDIMScheduler:
    """DDIM with Versatile Diffusion's training schedule (scaled_linear 0.00085–0.012, 1000 steps).

    ``steps_offset=1`` and ``set_alpha_to_one=False`` make ``set_timesteps(50)`` give Brain-Diffuser's
    DDIM timesteps 981, 961, …, 1. The img2img loop below uses only its ``alphas_cumprod``.
    """
    config = dict(num_train_timesteps=VD_NUM_TRAIN_TIMESTEPS, beta_start=VD_BETA_START, beta_end=VD_BETA_END,
                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="epsilon")
    config.update(overrides)
    return DDIMScheduler(**config)


def dual_transformer_like(tf: Transformer2DModel) -> DualTransformer2DModel:
    """An empty DualTransformer2DModel shaped like ``tf`` (its two slots are filled by the caller)."""
    cfg = tf.config
    return DualTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, num_layers=cfg.num_layers, dropout=cfg.dropout,
        norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.cross_attention_dim,
        attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
        num_vector_embeds=cfg.num_vector_embeds, activation_fn=cfg.activation_fn,
        num_embeds_ada_norm=cfg.num_embeds_ada_norm,
    )


def convert_to_dual_attention(image_unet: UNet2DConditionModel, text_unet: UNetFlatConditionModel) -> None:
    """Replace each Transformer2DModel of ``image_unet`` by a DualTransformer2DModel, in place.

    Same semantics as diffusers' ``VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention``:
    slot 0 keeps the image transformer, slot 1 takes the text UNet's transformer at the same module
    path (the modules are shared, not copied); the config records ``dual_cross_attention=True``.
    """
    apply_dual_transformer_patch()
    names = [n for n, m in image_unet.named_modules() if isinstance(m, Transformer2DModel)]
    if not names:
        raise ValueError("image_unet has no Transformer2DModel blocks to convert (already dual?)")
    for name in names:
        parent_name, index = name.rsplit(".", 1)
        image_tf = image_unet.get_submodule(parent_name)[int(index)]
        text_tf = text_unet.get_submodule(parent_name)[int(index)]
        dual = dual_transformer_like(image_tf)
        dual.transformers[0] = image_tf
        dual.transformers[1] = text_tf
        image_unet.get_submodule(parent_name)[int(index)] = dual
    image_unet.register_to_config(dual_cross_attention=True)


def dual_blocks(unet: UNet2DConditionModel) -> list[DualTransformer2DModel]:
    """All DualTransformer2DModel blocks of a UNet, in module order."""
    return [m for m in unet.modules() if isinstance(m, DualTransformer2DModel)]


def set_dual_mixing(unet: UNet2DConditionModel, mix_text: float, text_len: int, image_len: int) -> None:
    """Configure every dual block for context = concat(text tokens, image tokens) along dim 1.

    diffusers' block output is ``h + mix_ratio·(T_a(h)−h) + (1−mix_ratio)·(T_b(h)−h)`` for
    conditions (a, b); with a = text → text transformer and b = image → image transformer and
    ``mix_ratio = mix_text`` this is Brain-Diffuser's ``h + 0.6·(T_img(h)−h) + 0.4·(T_txt(h)−h)``
    for mix_text = 0.4 (mixed_ratio = 1 − mix_str). Equivalent to the pipeline's
    ``set_transformer_params(mix_text, ("text", "image"))`` but with the token counts given.
    """
    blocks = dual_blocks(unet)
    if not blocks:
        raise ValueError("image_unet has no DualTransformer2DModel blocks; build it with convert_to_dual_attention")
    for block in blocks:
        block.mix_ratio = float(mix_text)
        block.condition_lengths = [int(text_len), int(image_len)]
        block.transformer_index_for_condition = [1, 0]  # text → text transformer, image → image transformer


# --------------------------------------------------------------------------- load / save
def _require_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file() and not (path / "scheduler_config.json").is_file():
        raise UserError(f"{path}: missing Versatile Diffusion {what} (no config file there); {WEIGHTS_HINT}")


def _check_vd_schedule(scheduler: DDIMScheduler, where: Path) -> None:
    cfg = scheduler.config
    ok = (cfg.beta_schedule == "scaled_linear" and cfg.num_train_timesteps == VD_NUM_TRAIN_TIMESTEPS
          and math.isclose(cfg.beta_start, VD_BETA_START) and math.isclose(cfg.beta_end, VD_BETA_END)
          and cfg.trained_betas is None)
    if not ok:
        raise UserError(f"{where}: scheduler is not Versatile Diffusion's (expected scaled_linear "
                        f"{VD_BETA_START}–{VD_BETA_END}, {VD_NUM_TRAIN_TIMESTEPS} steps; got {cfg.beta_schedule} "
                        f"{cfg.beta_start}–{cfg.beta_end}, {cfg.num_train_timesteps})")


def load_versatile(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   *, vae_dtype: torch.dtype = torch.float32, keep_text_unet: bool = False) -> VersatileComponents:
    """Load VAE, dual image UNet and VD scheduler from a diffusers-format folder, offline.

    ``dtype`` is the UNet's (float16 on GPU as Brain-Diffuser); the VAE stays float32 by default
    (two calls per image, and it avoids fp16 overflow; Brain-Diffuser ran it in fp16). When
    ``image_unet/`` is plain, ``text_unet/`` is loaded and its transformers moved into dual blocks;
    the rest of the text UNet is dropped unless ``keep_text_unet`` (needed to re-save that layout).
    """
    apply_dual_transformer_patch()
    root = Path(path)
    if root.is_file() and root.suffix in (".pth", ".ckpt", ".pt"):
        # the original VD layout (Brain-Diffuser's vd-four-flow-v1-0-fp16-deprecated.pth), converted in memory
        from models.vd_convert import load_pth

        import logging

        logging.getLogger("recon").info("[versatile] %s: converting the original VD checkpoint in memory "
                                        "(`python -m models.vd_convert convert %s OUT_DIR` does it once)", root, root)
        components = load_pth(root)
        components.image_unet.to(device=torch.device(device), dtype=dtype).eval()
        components.vae.to(device=torch.device(device), dtype=vae_dtype).eval()
        return components
    if not root.is_dir():
        raise UserError(f"{root}: Versatile Diffusion folder not found; {WEIGHTS_HINT}")
    for sub in ("vae", "image_unet", "scheduler"):
        _require_dir(root / sub, sub)

    common = dict(local_files_only=True)
    try:
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=vae_dtype, **common)
        image_unet = UNet2DConditionModel.from_pretrained(root / "image_unet", torch_dtype=dtype, **common)
        text_unet = None
        if not image_unet.config.get("dual_cross_attention", False):
            _require_dir(root / "text_unet", "text_unet (image_unet/ is not dual, so its text transformers come from there)")
            text_unet = UNetFlatConditionModel.from_pretrained(root / "text_unet", torch_dtype=dtype, **common)
            convert_to_dual_attention(image_unet, text_unet)
        scheduler = vd_scheduler(**{k: v for k, v in DDIMScheduler.load_config(root / "scheduler", **common).items()
                                    if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                             "trained_betas")})
    except (OSError, EnvironmentError) as exc:  # a weight file missing or unreadable inside a component folder
        from models.checkpoint import first_line

        raise UserError(f"{root}: cannot load Versatile Diffusion ({first_line(exc)}); {WEIGHTS_HINT}") from None
    _check_vd_schedule(scheduler, root / "scheduler")

    device = torch.device(device)
    vae.to(device).eval()
    image_unet.to(device).eval()
    if text_unet is not None and keep_text_unet:
        text_unet.to(device).eval()
    return VersatileComponents(vae=vae, image_unet=image_unet, scheduler=scheduler,
                               text_unet=text_unet if keep_text_unet else None)


def save_versatile(components: VersatileComponents, path: str | os.PathLike) -> Path:
    """Write components in the layout ``load_versatile`` reads; the folder appears complete or not at all.

    With ``text_unet`` present, the upstream layout is written (plain image_unet + text_unet);
    without it, image_unet is saved already dual (config ``dual_cross_attention=True``).
    """
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root}: already exists and is not empty; remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    unet = components.image_unet
    components.vae.save_pretrained(tmp / "vae")
    components.scheduler.save_pretrained(tmp / "scheduler")
    if components.text_unet is None:
        unet.save_pretrained(tmp / "image_unet")
    else:
        components.text_unet.save_pretrained(tmp / "text_unet")
        # Temporarily put the plain image transformers back, save, and restore the same dual modules.
        slots = [(n.rsplit(".", 1), m) for n, m in unet.named_modules() if isinstance(m, DualTransformer2DModel)]
        try:
            for (parent, index), dual in slots:
                unet.get_submodule(parent)[int(index)] = dual.transformers[0]
            unet.register_to_config(dual_cross_attention=False)
            unet.save_pretrained(tmp / "image_unet")
        finally:
            for (parent, index), dual in slots:
                unet.get_submodule(parent)[int(index)] = dual
            unet.register_to_config(dual_cross_attention=True)
    if root.exists():
        root.rmdir()  # empty (checked above)
    os.replace(tmp, root)
    return root


def tiny_versatile(seed: int = 0, cross_attention_dim: int = 32,
                   vae_channels: tuple[int, ...] = (32, 32, 32, 32), norm_groups: int = 32,
                   unet_channels: tuple[int, ...] = (32, 64),
                   unet_cross_attention: tuple[bool, ...] = (True, False)) -> VersatileComponents:
    """Tiny random Versatile Diffusion with the real architectures (tests and the demo), CPU, float32.

    By default (the unit tests' nets) the VAE has 4 levels like SD's kl-f8, so images shrink 8×
    (64 px → 8×8 latents), and the UNets 2 levels with 4 dual blocks (down, mid, 2× up).
    ``cross_attention_dim`` must equal the tiny CLIP projection dim; ``vae_channels`` the VAE's width
    per level (n levels = 2^(n-1)x down-sampling); ``norm_groups`` the GroupNorm groups of VAE and
    UNets (32 = one channel per group at this width, which strips each channel's mean: harmless for
    random nets, but a trained VAE then cannot output flat colours, so the trained miniature uses 4
    channels per group as SD does); ``unet_channels`` the two UNets' width per level;
    ``unet_cross_attention`` which levels (top first) have dual vision/text attention blocks, as
    VD's UNet has them at its three upper levels and not at the lowest (the mid block always has one).
    Initialisation uses a private RNG stream, so the global torch seed is left untouched.
    """
    if len(unet_cross_attention) != len(unet_channels):
        raise ValueError(f"unet_cross_attention {unet_cross_attention} needs one entry per level of {unet_channels}")
    attn = tuple(unet_cross_attention)
    apply_dual_transformer_patch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=tuple(vae_channels),
            layers_per_block=1, norm_num_groups=norm_groups, sample_size=64,
            scaling_factor=VD_SCALING_FACTOR,
        )
        common = dict(sample_size=64 // 2 ** (len(vae_channels) - 1),  # the latent side at 64 px
                      block_out_channels=tuple(unet_channels), layers_per_block=1,
                      cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=norm_groups)

        def blocks(kind: str, suffix: str) -> tuple[str, ...]:
            names = tuple(("CrossAttn" if a else "") + f"{kind}Block{suffix}" for a in attn)
            return names if kind == "Down" else names[::-1]

        image_unet = UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=blocks("Down", "2D"), up_block_types=blocks("Up", "2D"), **common,
        )
        text_unet = UNetFlatConditionModel(
            in_channels=cross_attention_dim, out_channels=cross_attention_dim,
            down_block_types=blocks("Down", "Flat"), up_block_types=blocks("Up", "Flat"), **common,
        )
    convert_to_dual_attention(image_unet, text_unet)
    return VersatileComponents(vae=vae.eval(), image_unet=image_unet.eval(), scheduler=vd_scheduler(),
                               text_unet=text_unet.eval())
