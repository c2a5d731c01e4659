"""Train the miniature Brain-Diffuser on CPU (``make demo-models``), seeded, and write its weights.

    python -m miniature.train                      # full run, writes miniature/weights/
    python -m miniature.train --out /tmp/w --scale 0.05   # a quick smoke run (5 % of the steps)

Order: (1) a training pool of ``n_pool`` images with captions from the synthetic generator
(``prepare_data.synthetic.draw_pool``: its own random stream, never a subject's image);
(2) CLIP text + vision towers, symmetric InfoNCE on (image, caption) pairs; (3) VDVAE, negative
ELBO (DMoL likelihood + KL of every group) in nats/dim; (4) AutoencoderKL, L1 + MSE
reconstruction + small KL, then the latent scaling factor is set to 1/std of the scaled latents as
SD's 0.18215 was; (5) the dual-attention image UNet as an epsilon-prediction denoiser on the VAE
latents with VD's scaled-linear schedule (t in ``[0, unet_t_max)``, density rising as
t^(unet_t_power - 1)), conditioned on the trained CLIP's vision tokens and caption-averaged text
tokens (the features the ridge learns to predict), each condition replaced by its unconditional
embedding (gray image / empty caption) with probability ``p_drop`` so classifier-free guidance
works, each kept condition partly replaced by noise (``cond_noise``, as decoded embeddings are), and
the text/vision mixing drawn per step so both transformers of every dual block learn; its conditions
and latents are encoded once, from CLIP training's pixel values and the AutoencoderKL's scaling
pass. EMA weights are saved for VDVAE and UNet.
Weights are written as fp16 safetensors (max output change measured and recorded) with
``manifest.json``: sha256 per file, config, seed, command, final losses, wall time.

With ``parallel`` (the default) the AutoencoderKL and VDVAE train in two more processes while CLIP
trains in this one (VDVAE's at a lower priority, ``vdvae_nice``, so the AutoencoderKL, which has
the most work, does not end alone on one of two cores); the UNet then trains data-parallel in
``unet_ranks`` one-thread processes (torch.distributed over gloo, each rank half of every batch). Every stage draws from its own
random stream, so the schedule does not change the weights; the thread and rank counts can (float
reductions), and the manifest records them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import miniature
from pipeline import io
from pipeline.config import coerce
from pipeline.errors import UserError

log = logging.getLogger("recon")


@dataclass
class TrainConfig:
    seed: int = 0
    n_pool: int = 10000  # 4,200 UNet steps of 24 = 10 passes: at 3,000 images (64 passes) it memorised
    pool_image_size: int = 128  # the subjects' images are drawn at 128 px (configs/demo.toml)
    threads: int = 1  # per training process: tiny convolutions gain little from a second thread
    parallel: bool = True  # train the AutoencoderKL and VDVAE in two more processes while CLIP trains
    vdvae_nice: int = 3  # with parallel: the VDVAE process yields CPU to the AutoencoderKL, the longest stage
    unet_ranks: int = 2  # the UNet trains last, data-parallel in this many one-thread processes (train_unet)
    unet_threads: int = 2  # with unet_ranks = 1: the one process's threads
    clip_steps: int = 300
    clip_group: int = 1  # >1: half of each batch in groups this big of one colour pair (_clip_batch)
    clip_batch: int = 128
    clip_lr: float = 2e-3
    vdvae_steps: int = 1400
    vdvae_batch: int = 16
    vdvae_lr: float = 2e-3
    # >0: share of the VDVAE's steps over which the KL term's weight rises linearly 0 -> 1, then the
    # reference's plain ELBO. With 0 (the committed weights) the two 16x16 groups collapse (2.6e-3
    # nats/dim) and encode -> decode blurs the shapes; 0.5 fixes that but did not improve the demo
    # (README, tried and not adopted)
    vdvae_kl_warmup: float = 0.0
    vae_steps: int = 2400
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    unet_steps: int = 4200  # the 32/64/128-wide UNet at 16x16: about 1.2x the former 8x8 UNet's step, which took 4,900
    unet_batch: int = 24  # more steps of fewer images beat 4,200 of 32 in the same time (issue 15 notes)
    unet_lr: float = 1e-3
    unet_t_max: int = 800  # training timesteps in [0, unet_t_max): strength 0.75 noises to t 741 (701 at 10 steps)
    # timesteps t_max * u^(1/power): 44 % at t >= 600, where img2img takes the content from the condition
    unet_t_power: float = 2.0  # 1: uniform, the draw of the weights committed before
    p_drop: float = 0.15  # each condition independently replaced by its unconditional embedding
    cond_noise: float = 0.5  # largest share of each condition's variance replaced by noise (see _blur_condition)
    ema: float = 0.995
    # >0: the UNet's loss weighs the latent pixels along the drawn object's outline 1 + this (object_weights)
    unet_object_weight: float = 0.0


def _lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Run:
    """Step loop with a cosine schedule, grad clipping, EMA and a loss log."""

    def __init__(self, name: str, params, steps: int, lr: float, ema_model=None, ema: float = 0.0,
                 fused: bool | None = None):
        self.name, self.steps, self.base_lr = name, steps, lr
        self.params = [p for p in params if p.requires_grad]
        # fused=True (the UNet): one kernel over all ~300 tensors instead of one per tensor; its
        # optimizer step had been a tenth of a training step. None: torch's default (foreach)
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.99), fused=fused)
        self.ema_model, self.ema = ema_model, ema
        self.curve: list[dict] = []
        self.recent: dict[str, list[float]] = {}

    def step(self, i: int, loss: torch.Tensor, stats: dict[str, float], model=None) -> None:
        for g in self.opt.param_groups:
            g["lr"] = _lr(i, self.steps, self.base_lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 100.0)
        self.opt.step()
        if self.ema_model is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema_model.parameters()), list(model.parameters()), 1 - self.ema)
        for k, v in stats.items():
            self.recent.setdefault(k, []).append(float(v))
        every = max(1, self.steps // 20)
        if (i + 1) % every == 0 or i + 1 == self.steps:
            means = {k: float(np.mean(v)) for k, v in self.recent.items()}
            self.curve.append({"step": i + 1, **means})
            log.info("[miniature] %s step %d/%d %s", self.name, i + 1, self.steps,
                     " ".join(f"{k}={v:.4f}" for k, v in means.items()))
            self.recent = {}


def _steps(n: int, cfg: TrainConfig, scale: float) -> int:
    return max(2, int(round(n * scale)))


_STREAMS = {"vdvae": 1, "vae": 2, "unet": 3}


def _stream(cfg: TrainConfig, stage: str) -> np.random.Generator:
    """Each stage draws its batches from its own stream, so running stages side by side cannot
    change what any of them learns (CLIP keeps the plain ``default_rng(seed)`` it always had)."""
    if stage == "clip":
        return np.random.default_rng(cfg.seed)
    return np.random.default_rng([cfg.seed, _STREAMS[stage]])


# --------------------------------------------------------------------------- 1. pool
def make_pool(cfg: TrainConfig):
    from PIL import Image
    import torchvision.transforms.functional as TF

    from prepare_data.synthetic import colour_pair, draw_pool

    stim, caps, attrs = draw_pool(cfg.n_pool, cfg.pool_image_size, cfg.seed)
    side = miniature.build_vdvae().config.image_size
    # as each model sees them: VDVAE's PIL-bilinear resize to its input size; the VD init images are
    # the 64 px bicubic upsampled VDVAE outputs (vdvae_init.output_size of configs/demo.toml)
    vd_in = np.stack([np.asarray(TF.resize(Image.fromarray(im), [side, side])) for im in stim])
    vae_in = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.Resampling.BICUBIC)) for im in stim])
    return stim, caps, colour_pair(attrs), vd_in, vae_in


# --------------------------------------------------------------------------- 2. CLIP
def _clip_batch(pairs: np.ndarray, batch: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one CLIP batch. ``group`` 1 (the committed weights): uniform over the pool. In
    uniform batches of 128 colour alone tells nearly every pair apart, and the committed CLIP's
    vision CLS token encodes little shape (linear probe 30 %, chance 25 %; colour 100 %; the text
    tokens name it: ``python -m miniature.probe``). ``group`` > 1: half of the batch in groups of
    ``group`` images sharing a colour pair (``pairs``; -1 = photo, never grouped), the rest
    uniform, so the contrastive loss pays for encoding shape (700 such steps: shape probe 49 %, 9.4 % of
    the text tokens' variance; not adopted, README)."""
    if group <= 1:
        return rng.choice(len(pairs), batch, replace=False)
    values, counts = np.unique(pairs[pairs >= 0], return_counts=True)
    eligible = values[counts >= group]
    n_groups = min(batch // 2 // group, len(eligible))
    chosen = [rng.choice(np.flatnonzero(pairs == v), group, replace=False)
              for v in rng.choice(eligible, n_groups, replace=False)]
    grouped = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    rest = rng.choice(np.setdiff1d(np.arange(len(pairs)), grouped), batch - len(grouped), replace=False)
    return np.concatenate([grouped, rest])


def train_clip(cfg: TrainConfig, stim, caps, pairs, steps: int, rng: np.random.Generator):
    from models.clip import caption_mask

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip = miniature.build_clip(seed=cfg.seed)
    text, vision = clip.text_model.train().requires_grad_(True), clip.vision_model.train().requires_grad_(True)
    pixels = torch.cat([clip.pixel_values(stim[i:i + 256]) for i in range(0, len(stim), 256)])
    present = caption_mask(caps)
    ids_all = [clip.tokenize([str(c) for c in row[m]]) for row, m in zip(caps, present)]
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    run = _Run("clip", list(text.parameters()) + list(vision.parameters()) + [logit_scale], steps, cfg.clip_lr)
    for i in tqdm(range(steps), desc="train CLIP", unit="step"):
        idx = _clip_batch(pairs, cfg.clip_batch, cfg.clip_group, rng)
        ids = torch.stack([ids_all[j][rng.integers(len(ids_all[j]))] for j in idx])
        t = F.normalize(text(input_ids=ids).text_embeds, dim=-1)
        v = F.normalize(vision(pixel_values=pixels[idx]).image_embeds, dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * v @ t.T
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        acc = (logits.argmax(1) == target).float().mean()
        run.step(i, loss, {"loss": loss.item(), "top1": acc.item()})
    text.eval().requires_grad_(False)
    vision.eval().requires_grad_(False)
    return clip, run, pixels


def encode_conditions(clip, pixels: torch.Tensor, caps) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained CLIP's vision tokens and caption-averaged text tokens of the pool: what the UNet
    is conditioned on and the ridge learns to predict. Reuses CLIP training's pixel values, which
    are ``clip.encode_images``' own first step (its 512 px detour is most of the encoding time)."""
    vision = torch.cat([clip.encode_pixels(pixels[j:j + 256]) for j in range(0, len(pixels), 256)])
    text = torch.from_numpy(clip.encode_captions_per_image(caps, batch_size=256))
    return vision, text


# --------------------------------------------------------------------------- 3. VDVAE
def train_vdvae(cfg: TrainConfig, small, steps: int, rng: np.random.Generator, tqdm_position: int = 0):
    from models import vdvae as m

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = m.random_init_(miniature.build_vdvae(), seed=cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    run = _Run("vdvae", model.parameters(), steps, cfg.vdvae_lr, ema_model=ema, ema=cfg.ema)
    g = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(small).float()
    shift, scale = torch.tensor([m.INPUT_SHIFT]), torch.tensor([m.INPUT_SCALE])
    for i in tqdm(range(steps), desc="train VDVAE", unit="step", position=tqdm_position):
        x = data[rng.choice(len(data), cfg.vdvae_batch, replace=False)]
        out = m.elbo(model, (x + shift) * scale, x / 127.5 - 1.0, generator=g)
        beta = min(1.0, i / (cfg.vdvae_kl_warmup * steps)) if cfg.vdvae_kl_warmup > 0 else 1.0
        # at weight 1 the ELBO itself, so that without the warm-up the steps round as they did before it
        loss = out["loss"] if beta == 1.0 else out["distortion"] + beta * out["rate"]
        run.step(i, loss,
                 {"elbo": out["loss"].item(), "distortion": out["distortion"].item(),
                  "rate": out["rate"].item(), "kl_weight": beta}, model)
    return ema.eval(), run


# --------------------------------------------------------------------------- 4. AutoencoderKL
def train_vae(cfg: TrainConfig, vae, small, steps: int, rng: np.random.Generator, tqdm_position: int = 0):
    # start near-deterministic (posterior std e^-4): with VD's default logvar 0 the decoder first sees
    # unit noise and a short run only learns the mean image
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -8.0
    vae.train().requires_grad_(True)
    run = _Run("vae", vae.parameters(), steps, cfg.vae_lr)
    data = torch.from_numpy(small).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for i in tqdm(range(steps), desc="train AutoencoderKL", unit="step", position=tqdm_position):
        x = data[rng.choice(len(data), cfg.vae_batch, replace=False)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1, mse = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
        kl = post.kl().mean() / math.prod(x.shape[1:])
        loss = l1 + mse + cfg.vae_kl * kl
        run.step(i, loss, {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()})
    vae.eval().requires_grad_(False)
    # the pool pass on every core (34 s on one thread, 19 s on two, at 10,000 images): by now the
    # other phase-one stages are done or nearly, and an encoder forward pass gives the same bits on
    # any thread count (each output is summed by one thread; checked on the 2-core EPYC)
    threads = torch.get_num_threads()
    with torch.no_grad():
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        try:
            post = [vae.encode(data[j:j + 256]).latent_dist for j in range(0, len(data), 256)]
        finally:
            torch.set_num_threads(threads)
        zs = torch.cat([p.sample(generator=g) for p in post])
    scaling = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scaling)
    # the pool's posterior (unscaled), which the UNet trains on: encoded once, here
    latents = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
    return vae, run, scaling, latents


def _vae_job(cfg: TrainConfig, vae_in, steps: int, tqdm_position: int = 0):
    """The AutoencoderKL stage on its own, as run in the second training process: returns its
    fp32 state, loss curve, latent scaling factor, the pool's posterior (mean, std) and wall time
    (plain tensors and numbers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    vae = miniature.build_versatile(seed=cfg.seed).vae
    vae, run, scaling, latents = train_vae(cfg, vae, vae_in, steps, _stream(cfg, "vae"), tqdm_position)
    return vae.state_dict(), run.curve, scaling, latents, time.time() - t0


def _vdvae_job(cfg: TrainConfig, small, steps: int, tqdm_position: int = 0, nice: int = 0):
    """The VDVAE stage on its own, as run in a third training process: its EMA state, loss curve
    and wall time. ``nice`` > 0 lowers this process's priority: on two cores the three phase-one
    processes share them, and the AutoencoderKL, which has the most work, would otherwise finish
    last and alone, one core idle (only the schedule changes, never the weights)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    model, run = train_vdvae(cfg, small, steps, _stream(cfg, "vdvae"), tqdm_position)
    return model.state_dict(), run.curve, time.time() - t0


# --------------------------------------------------------------------------- 5. dual UNet
def _blur_condition(c, mean, std, max_share: float, rng: np.random.Generator, g: torch.Generator):
    """Replace a random share (uniform in ``[0, max_share]``, per image) of each embedding's
    deviation from the pool mean by noise of the pool's spread, keeping its per-dimension variance.

    The pipeline conditions the UNet on *decoded* embeddings, which the reference rescales to the
    training features' mean and std per dimension: the right spread but only partly the right
    values (test-set pattern correlation about 0.85-0.95 here). A miniature trained only on exact
    embeddings renders crisp, confidently wrong images from those; this makes it tolerate them.
    """
    if max_share <= 0:
        return c
    share = torch.from_numpy(rng.uniform(0, max_share, len(c))).float()[:, None, None]
    noise = torch.randn(c.shape, generator=g)
    return mean + (1 - share).sqrt() * (c - mean) + share.sqrt() * std * noise


def _unet_batch(cfg: TrainConfig, data: dict, ac: torch.Tensor, rng: np.random.Generator, g: torch.Generator):
    """One full UNet batch: noised latents, timesteps, targets, (text, vision) context, text mixing.
    Every rank draws the same batch from the same streams and trains on its own slice of it."""
    mean, std, vision, text = data["mean"], data["std"], data["vision"], data["text"]
    b = cfg.unet_batch
    idx = torch.from_numpy(rng.choice(len(mean), b, replace=False))
    z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
    t_max = min(cfg.unet_t_max, ac.shape[0])
    if cfg.unet_t_power == 1.0:  # the former uniform draw, kept so its weights still rebuild bitwise
        t = torch.randint(0, t_max, (b,), generator=g)
    else:  # density proportional to t^(power - 1): more of the steps where the shape must come from the condition
        t = (t_max * torch.rand(b, generator=g) ** (1 / cfg.unet_t_power)).long().clamp_(max=t_max - 1)
    eps = torch.randn(z0.shape, generator=g)
    a = ac[t][:, None, None, None]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    drop_t = torch.from_numpy(rng.random(b) < cfg.p_drop)[:, None, None]
    drop_v = torch.from_numpy(rng.random(b) < cfg.p_drop)[:, None, None]
    tc = torch.where(drop_t, data["t_unc"][None], _blur_condition(text[idx], *data["t_stats"], cfg.cond_noise, rng, g))
    vc = torch.where(drop_v, data["v_unc"][None], _blur_condition(vision[idx], *data["v_stats"], cfg.cond_noise, rng, g))
    w = data["objw"][idx] if "objw" in data else None
    return zt, t, eps, tc, vc, float(rng.uniform(0, 1)), w


def _unet_rank(rank: int, world: int, cfg: TrainConfig, unet, data: dict, steps: int, rng: np.random.Generator):
    """The UNet step loop of one rank. With ``world`` > 1 the ranks are torch.distributed (gloo)
    processes: each runs its ``1/world`` slice of every batch and DDP averages the gradients, so
    every rank takes the full batch's step (the same weights as one process, up to rounding)."""
    from models.versatile import set_dual_mixing

    data = {k: torch.from_numpy(v) for k, v in data.items()}
    data["v_stats"] = data["vision"].mean(0), data["vision"].std(0)
    data["t_stats"] = data["text"].mean(0), data["text"].std(0)
    ac = data.pop("alphas_cumprod")
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train().requires_grad_(True)
    model = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # one bucket, reduced once backward is done: overlapping the reduction with backward steals
        # the core the other rank computes on
        model = DistributedDataParallel(unet, gradient_as_bucket_view=True, bucket_cap_mb=100)
    run = _Run("unet", unet.parameters(), steps, cfg.unet_lr, ema_model=ema, ema=cfg.ema, fused=True)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    part = slice(rank * cfg.unet_batch // world, (rank + 1) * cfg.unet_batch // world)
    for i in tqdm(range(steps), desc="train dual UNet", unit="step", disable=rank > 0):
        zt, t, eps, tc, vc, mix, w = _unet_batch(cfg, data, ac, rng, g)
        set_dual_mixing(unet, mix, text_len=tc.shape[1], image_len=vc.shape[1])
        pred = model(zt[part], t[part], encoder_hidden_states=torch.cat([tc[part], vc[part]], dim=1)).sample
        loss = F.mse_loss(pred, eps[part])
        shown = loss.detach().clone()
        if w is not None:  # weighted, normalised to the batch's mean weight; the log shows the plain MSE
            loss = (w[part] * (pred - eps[part]).square()).mean() / w[part].mean()
        if world > 1:
            torch.distributed.all_reduce(shown)
            shown /= world
        run.step(i, loss, {"mse": shown.item()}, unet)
    return ema.eval(), run


_RANK_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that dies stops the others within this


def _unet_worker(rank: int, world: int, store: str, cfg: TrainConfig, data: dict, steps: int,
                 rng: np.random.Generator) -> None:
    """A UNet rank > 0 (a spawned process): rank 0 keeps the weights, so this one returns nothing."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=_RANK_TIMEOUT)
    try:
        _unet_rank(rank, world, cfg, miniature.build_versatile(seed=cfg.seed).image_unet, data, steps, rng)
    finally:
        torch.distributed.destroy_process_group()


def object_weights(images: np.ndarray, latent_size: int, weight: float) -> np.ndarray:
    """Per-image loss weights over the latent grid: 1 + ``weight`` along the drawn object's outline
    (the morphological gradient, 3x3 max minus 3x3 min, of the object's coverage of each latent
    pixel: both sides of the outline, not the interior).

    The object is the pixels more than 60 (RGB distance) from the median border colour; a photo's
    mask is whatever differs from its border, which is why this weighs and does not select. Why: in
    the plain MSE the outline is a few latent pixels of 256, so the UNet learns colours and places
    first and reads the caption's shape word hardly at all (README, probe table)."""
    img = images.astype(np.float32)
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
    bg = np.median(border, axis=1)[:, None, None]
    mask = np.linalg.norm(img - bg, axis=-1) > 60
    n, size = len(img), img.shape[1]
    k = size // latent_size
    cover = torch.from_numpy(mask.reshape(n, 1, latent_size, k, latent_size, k).mean(axis=(3, 5)).astype(np.float32))
    outline = F.max_pool2d(cover, 3, stride=1, padding=1) + F.max_pool2d(-cover, 3, stride=1, padding=1)
    return (1 + weight * outline).numpy()


def train_unet(cfg: TrainConfig, comps, clip, conditions, latents, steps: int, rng: np.random.Generator,
               images: np.ndarray | None = None):
    """``conditions``: the pool's (vision, text) tokens (``encode_conditions``); ``latents``: its
    AutoencoderKL posterior (mean, std), unscaled (``train_vae``); ``images``: the 64 px images those
    latents encode, needed only by ``unet_object_weight``.

    ``unet_ranks`` > 1 trains data-parallel in that many one-thread processes: on two cores two
    ranks of half a batch each step 1.2-1.3x faster than one process on two threads, whose tiny
    convolutions and 8-wide attention heads barely use the second thread (0.42 s a step on one
    thread, 0.31 on two, on the 2-core EPYC)."""
    from reconstruct.sampling import vd_alphas_cumprod

    sf = comps.vae.config.scaling_factor
    vision, text = conditions
    # numpy crosses to the other ranks by value (torch tensors would go through /dev/shm)
    data = {"mean": (latents[0] * sf).numpy(), "std": (latents[1] * sf).numpy(), "vision": vision.numpy(),
            "text": text.numpy(), "v_unc": clip.unconditional_image().numpy(),
            "t_unc": clip.unconditional_text().numpy(),
            "alphas_cumprod": vd_alphas_cumprod(comps.scheduler).float().numpy()}
    if cfg.unet_object_weight > 0:
        if images is None:
            raise ValueError("unet_object_weight > 0 needs the pool's 64 px images (object_weights)")
        data["objw"] = object_weights(images, latents[0].shape[-1], cfg.unet_object_weight)
    world = cfg.unet_ranks
    if world == 1:
        ema, run = _unet_rank(0, 1, cfg, comps.image_unet, data, steps, rng)
        comps.image_unet = ema
        return comps, run
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="recon-unet-") as tmp:
        store = str(Path(tmp) / "store")
        workers = [ctx.Process(target=_unet_worker, args=(r, world, store, cfg, data, steps, copy.deepcopy(rng)),
                               daemon=True) for r in range(1, world)]
        for w in workers:
            w.start()
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=world,
                                             timeout=_RANK_TIMEOUT)
        try:
            ema, run = _unet_rank(0, world, cfg, comps.image_unet, data, steps, rng)
        finally:
            torch.distributed.destroy_process_group()
            for w in workers:
                w.join(timeout=60)
                if w.is_alive():
                    w.kill()
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"a UNet training rank exited with code {failed[0]}")
    comps.image_unet = ema
    return comps, run


# --------------------------------------------------------------------------- writing
def _fp16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def _round_trip(module: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(module)
    out.load_state_dict({k: v.float() for k, v in _fp16_state(module).items()})
    return out


def _fp16_check(clip, vdvae, comps, small, vae_in, caps) -> dict[str, float]:
    """Largest output change caused by storing each network in fp16 (on pool images)."""
    from models import vdvae as m

    with torch.no_grad():
        imgs = small[:16]
        lat = m.extract_latents(vdvae, imgs, posterior="mean", progress=False)
        lat16 = m.extract_latents(_round_trip(vdvae), imgs, posterior="mean", progress=False)
        px = clip.pixel_values(imgs)
        v = clip.encode_pixels(px)
        vm = clip.vision_model
        clip.vision_model = _round_trip(vm)
        v16 = clip.encode_pixels(px)
        clip.vision_model = vm
        tm = clip.text_model
        t = clip.encode_text([str(c) for c in caps[:16, 0]])
        clip.text_model = _round_trip(tm)
        t16 = clip.encode_text([str(c) for c in caps[:16, 0]])
        clip.text_model = tm
        x = torch.from_numpy(vae_in[:16]).float().permute(0, 3, 1, 2) / 127.5 - 1
        rec = comps.vae.decode(comps.vae.encode(x).latent_dist.mean).sample
        vae16 = _round_trip(comps.vae)
        rec16 = vae16.decode(vae16.encode(x).latent_dist.mean).sample
    return {"vdvae_latents": float((lat - lat16).__abs__().max()), "clip_vision": float((v - v16).abs().max()),
            "clip_text": float((t - t16).abs().max()), "vae_pixels": float((rec - rec16).abs().max())}


def write_weights(out_dir: Path, modules: dict[str, torch.nn.Module], manifest: dict) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, module in modules.items():
        fname = miniature.FILES[name]
        with io.atomic_path(out_dir / fname) as tmp:
            # one metadata key: safetensors writes a metadata map in no fixed order, and two keys
            # made the same weights hash differently from run to run
            save_file(_fp16_state(module), str(tmp), metadata={"format": "pt"})
        files[fname] = {"sha256": miniature._sha256(out_dir / fname), "bytes": (out_dir / fname).stat().st_size,
                        "dtype": "float16", "parameters": int(sum(p.numel() for p in module.state_dict().values()))}
    manifest["files"] = files
    manifest["total_bytes"] = int(sum(f["bytes"] for f in files.values()))
    io.save_json(out_dir / miniature.MANIFEST, manifest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m miniature.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(miniature.WEIGHTS_DIR), help="weights folder (default: the committed one)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = TrainConfig()
    types = typing.get_type_hints(TrainConfig)
    for item in a.set:
        key, _, value = item.partition("=")
        if key not in types:
            p.error(f"unknown TrainConfig field {key!r}")
        try:  # the pipeline's own --set parsing: true/false/yes/no/1/0, int, float
            setattr(cfg, key, coerce(value, types[key], key))
        except UserError as e:
            p.error(str(e))
    if cfg.unet_ranks < 1 or cfg.unet_batch % cfg.unet_ranks:
        p.error(f"unet_batch ({cfg.unet_batch}) must split evenly over unet_ranks ({cfg.unet_ranks})")
    if cfg.unet_t_power <= 0:
        p.error(f"unet_t_power must be > 0, got {cfg.unet_t_power}")
    if cfg.unet_object_weight < 0:
        p.error(f"unet_object_weight must be >= 0, got {cfg.unet_object_weight}")
    if not 0 <= cfg.vdvae_kl_warmup <= 1:
        p.error(f"vdvae_kl_warmup must be in [0, 1], got {cfg.vdvae_kl_warmup}")
    torch.set_num_threads(cfg.threads)
    t_all = time.time()
    times = {}

    t0 = time.time()
    stim, caps, pairs, small, vae_in = make_pool(cfg)
    times["pool"] = time.time() - t0
    log.info("[miniature] pool: %d images in %.0f s", len(stim), times["pool"])

    # CLIP, VDVAE and the AutoencoderKL need none of each other: with `parallel` the last two train
    # in two more processes (one thread each) while this one trains CLIP; the UNet needs CLIP and
    # the AutoencoderKL and trains last
    vae_steps, vdvae_steps = _steps(cfg.vae_steps, cfg, a.scale), _steps(cfg.vdvae_steps, cfg, a.scale)
    pool = None
    if cfg.parallel:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        vae_future = pool.submit(_vae_job, cfg, vae_in, vae_steps, 1)
        vdvae_future = pool.submit(_vdvae_job, cfg, small, vdvae_steps, 2, cfg.vdvae_nice)
    try:
        t0 = time.time()
        clip, clip_run, pixels = train_clip(cfg, stim, caps, pairs, _steps(cfg.clip_steps, cfg, a.scale),
                                            _stream(cfg, "clip"))
        times["clip"] = time.time() - t0
        t0 = time.time()
        conditions = encode_conditions(clip, pixels, caps)
        del pixels  # 6 GB of 224 px float images at the full pool size
        times["conditions"] = time.time() - t0

        vdvae_state, vdvae_curve, times["vdvae"] = (vdvae_future.result() if pool is not None
                                                     else _vdvae_job(cfg, small, vdvae_steps))
        vae_state, vae_curve, scaling, latents, times["vae"] = (vae_future.result() if pool is not None
                                                                 else _vae_job(cfg, vae_in, vae_steps))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    vdvae = miniature.build_vdvae()
    vdvae.load_state_dict(vdvae_state)
    vdvae.eval().requires_grad_(False)
    comps = miniature.build_versatile(seed=cfg.seed)
    comps.vae.load_state_dict(vae_state)
    comps.vae.register_to_config(scaling_factor=scaling)
    comps.vae.eval().requires_grad_(False)

    t0 = time.time()
    torch.set_num_threads(cfg.unet_threads if cfg.unet_ranks == 1 else 1)
    comps, unet_run = train_unet(cfg, comps, clip, conditions, latents, _steps(cfg.unet_steps, cfg, a.scale),
                                 _stream(cfg, "unet"), vae_in)
    times["unet"] = time.time() - t0
    torch.set_num_threads(cfg.threads)

    fp16 = _fp16_check(clip, vdvae, comps, small, vae_in, caps)
    curves = {"clip": clip_run.curve, "vdvae": vdvae_curve, "vae": vae_curve, "unet": unet_run.curve}
    manifest = {
        "what": "trained miniature Brain-Diffuser (models.mode = \"trained-miniature\")",
        "rebuild": miniature.REBUILD + ("" if a.scale == 1.0 else f" (this run: --scale {a.scale})"),
        "seed": cfg.seed, "train_config": dataclasses.asdict(cfg), "scale": a.scale,
        "vae_scaling_factor": scaling,
        "final_losses": {k: c[-1] if c else {} for k, c in curves.items()},
        "loss_curves": curves,
        "fp16_max_abs_change": fp16,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()} | {"total": round(time.time() - t_all, 1)},
        "torch_threads": {"per_process": cfg.threads, "parallel": cfg.parallel, "unet_ranks": cfg.unet_ranks,
                          "unet": cfg.unet_threads if cfg.unet_ranks == 1 else 1},
        "versions": {"torch": torch.__version__},
    }
    write_weights(Path(a.out), {"vdvae": vdvae, "clip_text": clip.text_model, "clip_vision": clip.vision_model,
                                "vae": comps.vae, "image_unet": comps.image_unet}, manifest)
    log.info("[miniature] wrote %s (%.1f MB) in %.0f s", a.out, manifest["total_bytes"] / 1e6, time.time() - t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
