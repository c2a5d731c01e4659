"""Benchmark: images/s of batched Versatile Diffusion img2img vs a one-image-at-a-time loop.

Reference approach: Brain-Diffuser reconstructs one image at a time (one UNet call of 2 samples,
[uncond; cond], per DDIM step).  ``per_image_loop`` below is that straightforward loop, written here
on the same components, noise draws and schedule arithmetic; ``reconstruct.sampling.img2img`` with
``batch_size=B`` runs B images per UNet call (2·B samples).  Both get one generator per image (seed
``--seed + i``), so the outputs must agree; the max abs difference of the float outputs
(``output_type="float"``, [0, 1]) is printed.  ``img2img`` with ``batch_size=1`` is timed as a third row.

Embeddings are random tensors of the real token counts (257 CLIP-vision, 77 CLIP-text) and the
UNet's cross-attention width D; init images are random uint8.

    python benchmarks/versatile_bench.py                           # tiny random VD on CPU, 64 px
    python benchmarks/versatile_bench.py --images 16 --batch-size 8
    python benchmarks/versatile_bench.py --weights weights/versatile-diffusion --device cuda   # fp16 UNet, 512 px
    python benchmarks/versatile_bench.py --real-size --device cuda --repeats 2   # published sizes, random weights

``--real-size`` builds Versatile Diffusion at its published architecture with random weights (no
download): the SD-1.x image UNet (320/640/1280/1280 channels, 2 layers per block, cross-attention
width 768, 8 heads) with the text flow's transformers moved into dual blocks (the text UNet is
built with the same block layout, 768 in/out channels, and only its transformers are kept), and
the kl-f8 AutoencoderKL (128/256/512/512, 2 layers per block).  Random weights give noise images,
but the same arithmetic per step as the real model, so images/s and the batch-size agreement
are real figures.  The last line also compares the batched run with img2img(batch_size=1).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import versatile as vd  # noqa: E402
from reconstruct import sampling as sampler  # noqa: E402


@torch.no_grad()
def per_image_loop(c: vd.VersatileComponents, init_images: np.ndarray, vc, tc, vu, tu, *, strength: float,
                   steps: int, guidance: float, mix_text: float, generators) -> np.ndarray:
    """Brain-Diffuser-style loop: encode, noise, denoise (batch of 2) and decode ONE image at a time.

    init_images (N,H,W,3) uint8; vc (N,257,D), tc (N,77,D), vu (257,D), tu (77,D) -> (N,H,W,3) float32 in [0,1].
    Noise per image: posterior sample then forward noise, both from that image's generator (CPU draws).
    """
    unet, vae = c.image_unet, c.vae
    dev = unet.device
    sched = sampler.img2img_schedule(sampler.vd_alphas_cumprod(c.scheduler), steps, strength)
    vd.set_dual_mixing(unet, mix_text, text_len=tc.shape[1], image_len=vc.shape[1])
    sf = vae.config.scaling_factor
    uncond = torch.cat([tu, vu], dim=0)[None].to(dev, unet.dtype)
    out = []
    for i in range(len(init_images)):
        g = generators[i]
        x = torch.from_numpy(init_images[i]).permute(2, 0, 1)[None].float() / 255.0
        post = vae.encode((x * 2 - 1).to(dev, vae.dtype)).latent_dist
        mean, std = post.mean.float(), post.std.float()
        z = (mean + std * torch.randn(mean.shape, generator=g).to(dev)) * sf
        z = math.sqrt(sched.noise_alpha) * z + math.sqrt(1 - sched.noise_alpha) * torch.randn(z.shape, generator=g).to(dev)
        ctx = torch.cat([uncond, torch.cat([tc[i], vc[i]], dim=0)[None].to(dev, unet.dtype)])
        for t, a_t, a_prev in zip(sched.timesteps, sched.alpha, sched.alpha_prev):
            e_u, e_c = unet(torch.cat([z, z]).to(unet.dtype), torch.full((2,), t, device=dev),
                            encoder_hidden_states=ctx).sample.float().chunk(2)
            e = e_u + guidance * (e_c - e_u)
            x0 = (z - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
        img = vae.decode((z / sf).to(vae.dtype)).sample.float()
        out.append(torch.clamp((img + 1) / 2, 0, 1)[0].permute(1, 2, 0).cpu().numpy())
    return np.stack(out)


def real_size_versatile(seed: int, device: torch.device) -> vd.VersatileComponents:
    """Versatile Diffusion at its published sizes with random weights, built directly on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion import UNetFlatConditionModel

    vd.apply_dual_transformer_patch()
    blocks = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                            sample_size=512, scaling_factor=vd.VD_SCALING_FACTOR)
        image_unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **blocks)
        text_unet = UNetFlatConditionModel(
            in_channels=768, out_channels=768,
            down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
            up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **blocks)
    n_text = sum(p.numel() for p in text_unet.parameters())
    vd.convert_to_dual_attention(image_unet, text_unet)
    del text_unet  # only its transformers are used for images (now inside the dual blocks)
    n_unet = sum(p.numel() for p in image_unet.parameters())
    print(f"real-size random VD: dual image UNet {n_unet / 1e6:.0f} M parameters (text UNet built with "
          f"{n_text / 1e6:.0f} M), VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M")
    return vd.VersatileComponents(vae=vae.eval(), image_unet=image_unet.eval(), scheduler=vd.vd_scheduler())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="diffusers-format VD folder (load_versatile); default: tiny random VD")
    ap.add_argument("--real-size", action="store_true",
                    help="random weights at the published architecture sizes (no download; see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp32", action="store_true", help="keep the UNet in float32 on CUDA (default fp16 there)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50, help="DDIM grid size (strength 0.75 -> 37 UNet steps at 50)")
    ap.add_argument("--strength", type=float, default=0.75)
    ap.add_argument("--size", type=int, help="init image side in px (default 64 tiny, 512 real)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default 1 on CPU: tiny models gain little from threads, and "
                         "oversubscribed threads on a shared CPU make timings erratic; torch's default on CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method, interleaved; best is reported")
    ap.add_argument("--skip-batch1", action="store_true", help="do not time img2img(batch_size=1)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    threads = a.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float16 if device.type == "cuda" and not a.fp32 else torch.float32
    if a.weights and a.real_size:
        ap.error("--weights and --real-size exclude each other")
    if a.weights:
        comps = vd.load_versatile(a.weights, device=device, dtype=dtype)
        what = f"Versatile Diffusion from {a.weights}"
    elif a.real_size:
        t0 = time.perf_counter()
        comps = real_size_versatile(a.seed, device)
        comps.image_unet.to(dtype)
        what = f"real-size random Versatile Diffusion (built in {time.perf_counter() - t0:.1f}s)"
    else:
        comps = vd.tiny_versatile(a.seed)
        comps.vae.to(device)
        comps.image_unet.to(device)
        if dtype != torch.float32:
            comps.image_unet.to(dtype)
        what = "tiny random Versatile Diffusion (tiny_versatile)"
    size = a.size or (512 if a.weights or a.real_size else 64)
    D = comps.image_unet.config.cross_attention_dim
    n = a.images
    t_enc = int(a.strength * a.steps)
    print(f"{what}; device={device}, UNet {comps.image_unet.dtype}, VAE {comps.vae.dtype}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{n} images of {size} px, {a.steps} DDIM steps × strength {a.strength} = {t_enc} UNet steps/image, "
          f"D={D}, batch_size={a.batch_size}")

    rng = np.random.default_rng(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    init = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    vc, tc = torch.randn(n, 257, D, generator=g), torch.randn(n, 77, D, generator=g)
    vu, tu = torch.randn(257, D, generator=g), torch.randn(77, D, generator=g)
    kw = dict(strength=a.strength, num_inference_steps=a.steps, guidance_scale=7.5, mix_text=0.4,
              output_type="float", progress=False)

    def gens():
        return [torch.Generator().manual_seed(a.seed + i) for i in range(n)]

    # warm-up (kernels, allocator, lazy inits), untimed
    sampler.img2img(comps, init[:1], vc[:1], tc[:1], vu, tu, **{**kw, "num_inference_steps": 4},
               generators=gens()[:1], batch_size=1)
    sync(device)

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t

    loop = "per-image loop (reference)"
    batched = f"img2img batch_size={a.batch_size}"
    methods = {loop: lambda: per_image_loop(comps, init, vc, tc, vu, tu, strength=a.strength, steps=a.steps,
                                            guidance=7.5, mix_text=0.4, generators=gens())}
    if not a.skip_batch1:
        methods["img2img batch_size=1"] = lambda: sampler.img2img(comps, init, vc, tc, vu, tu, **kw,
                                                             generators=gens(), batch_size=1)
    methods[batched] = lambda: sampler.img2img(comps, init, vc, tc, vu, tu, **kw, generators=gens(),
                                          batch_size=a.batch_size)
    outs, times = {}, {name: [] for name in methods}
    for _ in range(a.repeats):  # interleaved, so a burst of load on a shared machine hits every method
        for name, fn in methods.items():
            outs[name], s = timed(fn)
            times[name].append(s)

    best = {name: min(ts) for name, ts in times.items()}
    ref_out = outs[loop]
    print(f"best of {a.repeats} interleaved runs (median in brackets); load average {os.getloadavg()[0]:.2f}")
    print(f"  {'':<28} {'seconds':>16} {'images/s':>9} {'vs loop':>8} {'max|Δ| vs loop':>15}")
    for name in methods:
        diff = float(np.abs(outs[name].astype(np.float64) - ref_out).max())
        secs = f"{best[name]:.2f} ({np.median(times[name]):.2f})"
        print(f"  {name:<28} {secs:>16} {n / best[name]:>9.3f} {best[loop] / best[name]:>7.2f}x {diff:>15.2e}")
    if not a.skip_batch1:
        b1 = "img2img batch_size=1"
        nan = int(sum(np.isnan(o).sum() for o in outs.values()))
        print(f"BATCH SIZES: img2img batch_size={a.batch_size} {n / best[batched]:.3f} img/s vs batch_size=1 "
              f"{n / best[b1]:.3f} img/s = {best[b1] / best[batched]:.2f}x; max abs image difference between the "
              f"two batch sizes {float(np.abs(outs[batched].astype(np.float64) - outs[b1]).max()):.2e} "
              f"(float outputs in [0, 1]; {nan} NaN values)")
    print(f"SPEEDUP {best[loop] / best[batched]:.2f}x images/s (img2img batch_size={a.batch_size} "
          f"{n / best[batched]:.3f} img/s vs per-image loop {n / best[loop]:.3f} img/s on {device}); "
          f"max abs diff of float outputs {float(np.abs(outs[batched].astype(np.float64) - ref_out).max()):.2e}")


if __name__ == "__main__":
    main()
