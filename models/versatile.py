"""Versatile Diffusion through diffusers, and Brain-Diffuser's dual-guided img2img on given embeddings.

Brain-Diffuser (method.md §5) runs Versatile Diffusion's image UNet with, at every cross-attention
slot, both the image-UNet transformer (fed CLIP-vision tokens) and the text-UNet transformer (fed
CLIP-text tokens), mixing their residuals 0.6 / 0.4. diffusers expresses the same network as a
``UNet2DConditionModel`` whose attention blocks are ``DualTransformer2DModel``s; this module builds
that network from a diffusers-format folder (the layout of HF ``shi-labs/versatile-diffusion``) and
implements the img2img loop with Brain-Diffuser's exact schedule arithmetic.

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
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

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
                   vae_channels: tuple[int, ...] = (32, 32, 32, 32), norm_groups: int = 32) -> VersatileComponents:
    """Tiny random Versatile Diffusion with the real architectures (tests and the demo), CPU, float32.

    VAE: 4 levels like SD's kl-f8, so images shrink 8× (64 px → 8×8 latents); UNets: 2 levels with
    4 dual blocks (down, mid, 2× up). ``cross_attention_dim`` must equal the tiny CLIP projection
    dim; ``vae_channels`` the VAE's width per level (four levels = 8x down-sampling); ``norm_groups`` the
    GroupNorm groups of VAE and UNets (32 = one channel per group at this width, which strips each
    channel's mean: harmless for random nets, but a trained VAE then cannot output flat colours, so
    the trained miniature uses 4 channels per group as SD does).
    Initialisation uses a private RNG stream, so the global torch seed is left untouched.
    """
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
        common = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                      cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=norm_groups)
        image_unet = UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
        text_unet = UNetFlatConditionModel(
            in_channels=cross_attention_dim, out_channels=cross_attention_dim,
            down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
            up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"), **common,
        )
    convert_to_dual_attention(image_unet, text_unet)
    return VersatileComponents(vae=vae.eval(), image_unet=image_unet.eval(), scheduler=vd_scheduler(),
                               text_unet=text_unet.eval())


# --------------------------------------------------------------------------- schedule
def vd_alphas_cumprod(scheduler: DDIMScheduler) -> torch.Tensor:
    """ᾱ_t for t = 0..999 exactly as Brain-Diffuser's model buffer: float64 betas, cumprod, cast to float32.

    (diffusers computes the betas in float32; the two agree to ~1e-7.) Returned as float64 holding
    the float32 values, shape (1000,).
    """
    cfg = scheduler.config
    if cfg.beta_schedule != "scaled_linear":
        raise ValueError(f"expected VD's scaled_linear schedule, got {cfg.beta_schedule}")
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32).to(torch.float64)


@dataclass(frozen=True)
class Img2ImgSchedule:
    """Brain-Diffuser's img2img schedule (method.md §5.2 steps 4, 5, 8, 9).

    ddim_timesteps: (S,) DDPM steps of the DDIM grid, ascending (1, 21, …, 981 for S = 50).
    t_enc: number of denoising steps, int(strength·S).
    noise_timestep: DDPM step whose ᾱ noises the init latent (741 by default: ddim_timesteps[t_enc]).
    timesteps: (t_enc,) UNet timesteps, descending (721, 701, …, 1).
    alpha, alpha_prev: (t_enc,) ᾱ at each step and at the next-lower DDIM step (ᾱ_0 after t = 1).
    noise_alpha: ᾱ at noise_timestep.
    """

    ddim_timesteps: tuple[int, ...]
    t_enc: int
    noise_timestep: int | None
    noise_alpha: float
    timesteps: tuple[int, ...]
    alpha: tuple[float, ...]
    alpha_prev: tuple[float, ...]


def img2img_schedule(alphas_cumprod: torch.Tensor, num_inference_steps: int, strength: float,
                     reference_offset: bool = True) -> Img2ImgSchedule:
    """Timesteps and ᾱ values of Brain-Diffuser's img2img (``ddim_vd.py`` make_schedule/stochastic_encode/decode_dc).

    DDIM grid: ``arange(S)·(T//S) + 1`` (Brain-Diffuser's ``range(0, T, T//S) + 1`` whenever S divides
    T; otherwise that has more than S entries, and the diffusers "leading" grid with exactly S is used).
    ``reference_offset=True`` reproduces Brain-Diffuser's off-by-one inherited from SD img2img: the
    init latent is noised to the level of ddim_timesteps[t_enc] (741) but denoising starts at
    ddim_timesteps[t_enc−1] (721). ``False`` noises at the level of the first denoising step.
    """
    n_train = alphas_cumprod.shape[0]
    if not 1 <= num_inference_steps <= n_train:
        raise UserError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")
    ac = alphas_cumprod.to(torch.float64)
    grid = [i * (n_train // num_inference_steps) + 1 for i in range(num_inference_steps)]
    t_enc = int(strength * num_inference_steps)
    if reference_offset:
        if t_enc >= num_inference_steps:
            raise UserError(f"strength {strength} with reference_offset=True noises past the last DDIM step "
                            "(Brain-Diffuser indexes ddim_timesteps[t_enc]); use strength < 1 or reference_offset=False")
        noise_t: int | None = grid[t_enc]
    else:
        noise_t = grid[t_enc - 1] if t_enc > 0 else None
    indices = list(range(t_enc))[::-1]
    return Img2ImgSchedule(
        ddim_timesteps=tuple(grid),
        t_enc=t_enc,
        noise_timestep=noise_t,
        noise_alpha=float(ac[noise_t]) if noise_t is not None else 1.0,
        timesteps=tuple(grid[i] for i in indices),
        alpha=tuple(float(ac[grid[i]]) for i in indices),
        alpha_prev=tuple(float(ac[grid[i - 1]]) if i > 0 else float(ac[0]) for i in indices),
    )


# --------------------------------------------------------------------------- noise sources
class BrainDiffuserRNG:
    """Brain-Diffuser's random streams after one ``torch.manual_seed(seed)``, consumed image by image.

    In the original run the VAE posterior noise is ``torch.randn`` on the CPU generator (ldm's
    DiagonalGaussianDistribution.sample, then moved to the GPU) and the img2img noise is
    ``randn_like`` on the GPU holding the latent, so on CUDA there are two streams: CPU for the
    posterior, the device's for the forward noise. On a CPU-only device both come from one CPU
    stream, in the order posterior(k), noise(k), posterior(k+1), … (Brain-Diffuser's DDIM steps also
    draw σ=0 noise, on a third device in its run; those draws are not emulated). Keep one instance
    for a whole subject and feed images in order: it carries its state across img2img calls.
    """

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        device = torch.device(device)
        self.posterior = torch.Generator("cpu").manual_seed(seed)
        self.forward = self.posterior if device.type == "cpu" else torch.Generator(device).manual_seed(seed)

    def draws(self, index: int) -> tuple[torch.Generator, torch.Generator]:
        return self.posterior, self.forward


class _PerImageNoise:
    """One generator per image: posterior noise then forward noise, both from that image's generator."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def draws(self, index: int) -> tuple[torch.Generator, torch.Generator]:
        return self.generators[index], self.generators[index]


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 normal noise drawn on the generator's device, then moved (CPU generators give device-independent results)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


# --------------------------------------------------------------------------- img2img
def _as_tensor(x, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != ndim:
        raise UserError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _init_to_unit(init_images) -> torch.Tensor:
    """(N,H,W,3) uint8 or float in [0,1] → (N,3,H,W) float32 in [0,1] (uint8/255 like ToTensor)."""
    x = _as_tensor(init_images, "init_images", 4)
    if x.shape[-1] != 3:
        raise UserError(f"init_images: expected (N,H,W,3), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
        if x.numel() and (x.min() < 0 or x.max() > 1 or not torch.isfinite(x).all()):
            raise UserError("init_images: float images must lie in [0, 1]")
    else:
        raise UserError(f"init_images: expected uint8 or float in [0, 1], got {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def img2img(
    components: VersatileComponents,
    init_images,
    vision_cond,
    text_cond,
    vision_uncond,
    text_uncond,
    *,
    strength: float = 0.75,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    mix_text: float = 0.4,
    generators: Sequence[torch.Generator] | None = None,
    reference_rng: BrainDiffuserRNG | None = None,
    reference_offset: bool = True,
    batch_size: int = 4,
    output_type: str = "uint8",
    progress: bool = True,
    init_latents=None,
) -> np.ndarray:
    """Brain-Diffuser's dual-guided img2img on given CLIP embeddings (method.md §5.2).

    init_images: (N,H,W,3) uint8, or float in [0,1]; H, W multiples of the VAE factor (8; 512 px in BD).
    vision_cond: (N,Lv,D) predicted CLIP-vision tokens (Lv = 257); text_cond: (N,Lt,D) CLIP-text (Lt = 77).
    vision_uncond: (Lv,D) embedding of the gray image; text_uncond: (Lt,D) embedding of the empty prompt.
    Noise: ``generators`` (one per image: results do not depend on ``batch_size``) or ``reference_rng``
    (Brain-Diffuser's sequential seed-0 stream). ``batch_size`` images share one UNet call of
    2·batch_size samples ([uncond; cond]). Returns (N,H,W,3) uint8 (``output_type="uint8"``, BD's
    PNG values) or float32 in [0,1] before the ×255 truncation (``"float"``, for comparisons).
    ``init_latents``: (N,C,h,w) latents in the diffusion's (scaled) space used instead of encoding
    images (``init_images`` is then None): the paper's "w/o VDVAE" = random AutoKL latent.
    """
    # 0. check inputs
    unet, vae = components.image_unet, components.vae
    device = unet.device
    f = components.vae_scale_factor
    if init_latents is not None:
        if init_images is not None:
            raise UserError("give init_images or init_latents, not both")
        lat = _as_tensor(init_latents, "init_latents", 4).to(torch.float32)
        if lat.shape[1] != vae.config.latent_channels:
            raise UserError(f"init_latents: expected {vae.config.latent_channels} channels, got shape {tuple(lat.shape)}")
        n, height, width = lat.shape[0], lat.shape[2] * f, lat.shape[3] * f
        x_unit = None
    else:
        x_unit = _init_to_unit(init_images)
        n, _, height, width = x_unit.shape
    if height % f or width % f:
        raise UserError(f"init_images: height and width must be multiples of {f}, got {height}×{width}")
    vc, tc = _as_tensor(vision_cond, "vision_cond", 3), _as_tensor(text_cond, "text_cond", 3)
    vu, tu = _as_tensor(vision_uncond, "vision_uncond", 2), _as_tensor(text_uncond, "text_uncond", 2)
    dim = unet.config.cross_attention_dim
    for name, t, first in (("vision_cond", vc, n), ("text_cond", tc, n)):
        if t.shape[0] != first or t.shape[-1] != dim:
            raise UserError(f"{name}: expected ({n}, L, {dim}) for {n} init images, got {tuple(t.shape)}")
    if tuple(vu.shape) != tuple(vc.shape[1:]) or tuple(tu.shape) != tuple(tc.shape[1:]):
        raise UserError(f"uncond embeddings must match one cond row: vision {tuple(vc.shape[1:])} vs {tuple(vu.shape)}, "
                        f"text {tuple(tc.shape[1:])} vs {tuple(tu.shape)}")
    if not 0.0 <= mix_text <= 1.0:
        raise UserError(f"mix_text must be in [0, 1], got {mix_text}")
    if output_type not in ("uint8", "float"):
        raise UserError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if (generators is None) == (reference_rng is None):
        raise UserError("give exactly one of generators (one per image) or reference_rng")
    if generators is not None and len(generators) != n:
        raise UserError(f"generators: expected one per image ({n}), got {len(generators)}")
    noise = reference_rng if reference_rng is not None else _PerImageNoise(generators)
    apply_dual_transformer_patch()

    # 1. timesteps and ᾱ (Brain-Diffuser's DDIM arithmetic, not DDIMScheduler.step)
    sched = img2img_schedule(vd_alphas_cumprod(components.scheduler), num_inference_steps, strength, reference_offset)
    set_dual_mixing(unet, mix_text, text_len=tc.shape[1], image_len=vc.shape[1])
    # context = concat(text, vision) tokens; rows [uncond; cond]
    uncond_ctx = torch.cat([tu, vu], dim=0).to(device=device, dtype=unet.dtype)
    cond_ctx = torch.cat([tc, vc], dim=1).to(device=device, dtype=unet.dtype)
    sf = vae.config.scaling_factor

    out = np.empty((n, height, width, 3), dtype=np.uint8 if output_type == "uint8" else np.float32)
    bar = tqdm(total=n * sched.t_enc, desc="versatile img2img", unit="step", disable=not progress)
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        b = len(idx)
        # 2. encode the init images: posterior SAMPLE × scaling factor, then noise to the start level
        if x_unit is not None:
            posterior = vae.encode((x_unit[start:start + b] * 2 - 1).to(device=device, dtype=vae.dtype)).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
        z = []
        for k, i in enumerate(idx):
            g_post, g_fwd = noise.draws(i)
            if x_unit is None:  # given latents: no encoder, no posterior draw
                z0 = lat[start + k:start + k + 1].to(device)
            else:
                z0 = (mean[k:k + 1] + std[k:k + 1] * _randn(tuple(mean[k:k + 1].shape), g_post, device)) * sf
            if sched.noise_timestep is not None:
                eps = _randn(tuple(z0.shape), g_fwd, device)
                z0 = math.sqrt(sched.noise_alpha) * z0 + math.sqrt(1.0 - sched.noise_alpha) * eps
            z.append(z0)
        x = torch.cat(z)  # float32 (b,4,h,w)
        ctx = torch.cat([uncond_ctx[None].expand(b, -1, -1), cond_ctx[start:start + b]])

        # 3. denoise: deterministic DDIM (η = 0) with classifier-free guidance, one UNet call per step
        for t, a_t, a_prev in zip(sched.timesteps, sched.alpha, sched.alpha_prev):
            t_in = torch.full((2 * b,), t, dtype=torch.long, device=device)
            e = unet(torch.cat([x, x]).to(unet.dtype), t_in, encoder_hidden_states=ctx).sample.float()
            e_u, e_c = e.chunk(2)
            e = e_u + guidance_scale * (e_c - e_u)
            x0 = (x - math.sqrt(1.0 - a_t) * e) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * e
            bar.update(b)

        # 4. decode, clamp to [0,1], ×255 truncated like torchvision's ToPILImage
        img = vae.decode((x / sf).to(vae.dtype)).sample.float()
        img = torch.clamp((img + 1.0) / 2.0, 0.0, 1.0)
        if output_type == "uint8":
            img = (img * 255).to(torch.uint8)
        out[start:start + b] = img.permute(0, 2, 3, 1).cpu().numpy()
    bar.close()
    return out
