"""Brain-Diffuser's dual-guided img2img sampler on Versatile Diffusion (method.md §5.2).

The network (``models.versatile``: VAE, dual-attention image UNet, VD scheduler config, the diffusers
patch) is kept apart from the sampling here, as diffusers keeps pipelines apart from models: this
module holds Brain-Diffuser's schedule arithmetic (``ddim_vd.py`` make_schedule/stochastic_encode/
decode_dc), its noise sources (the reference's single seeded stream, or one generator per image) and
the img2img loop. The loop's keyword defaults are :class:`pipeline.config.VersatileConfig`'s, declared
there once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from models.versatile import VersatileComponents, apply_dual_transformer_patch, set_dual_mixing
from pipeline.config import VersatileConfig
from pipeline.errors import UserError

_DEFAULTS = VersatileConfig()


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
    strength: float = _DEFAULTS.strength,
    num_inference_steps: int = _DEFAULTS.num_inference_steps,
    guidance_scale: float = _DEFAULTS.guidance_scale,
    mix_text: float = _DEFAULTS.mix_text,
    generators: Sequence[torch.Generator] | None = None,
    reference_rng: BrainDiffuserRNG | None = None,
    reference_offset: bool = _DEFAULTS.reference_offset,
    batch_size: int = _DEFAULTS.batch_size,
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
