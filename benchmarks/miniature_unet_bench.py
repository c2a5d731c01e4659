"""Benchmark: s/step of the miniature's UNet training, two one-thread gloo ranks vs one process.

Reference approach: one process training on the full batch with every core as torch threads
(``unet_ranks = 1, unet_threads = cores``, how ``make demo-models`` trained the UNet before).
Against it ``miniature.train.train_unet`` with ``unet_ranks = 2``: two processes of one thread
each, half a batch each, DDP averaging the gradients. Both run the real training loop
(``train_unet``) at the real sizes of ``make demo-models``: the miniature's dual UNet
(``models.miniature.UNET_CHANNELS``), batch 24, its 4-channel latents (16x16), 257 vision and 77
text tokens of width 32, a pool of 10,000; the conditions are random tensors of those shapes (the
step's arithmetic does not depend on their values).

Startup (spawning the rank, sending it the pool) is measured apart: each variant runs ``--warm``
steps and then ``--warm + --steps`` steps, and the difference gives the steady s/step. The
variants alternate ``--repeats`` times, since a shared 2-core machine drifts by 10-20 % over
minutes. Also prints how far apart the two variants' weights end (rounding only).

    python benchmarks/miniature_unet_bench.py                  # 3 x 120 steps each, ~8 min on 2 cores
    python benchmarks/miniature_unet_bench.py --steps 40 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import miniature  # noqa: E402
from miniature import train  # noqa: E402


def _run(ranks: int, threads: int, steps: int, data) -> tuple[float, dict]:
    conditions, latents = data
    cfg = train.TrainConfig(unet_ranks=ranks, unet_threads=threads)
    torch.set_num_threads(threads if ranks == 1 else 1)
    comps = miniature.build_versatile(seed=0)
    t0 = time.perf_counter()
    comps, _ = train.train_unet(cfg, comps, miniature.build_clip(seed=0), conditions, latents, steps,
                                np.random.default_rng(0))
    return time.perf_counter() - t0, comps.image_unet.state_dict()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="timed steps per variant and repeat")
    p.add_argument("--warm", type=int, default=10, help="steps of the startup run subtracted")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool", type=int, default=10000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the reference's torch threads")
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n = a.pool
    side = 64 // miniature.build_versatile(seed=0).vae_scale_factor
    data = ((torch.randn(n, 257, 32, generator=g), torch.randn(n, 77, 32, generator=g)),
            (torch.randn(n, 4, side, side, generator=g), 0.1 * torch.rand(n, 4, side, side, generator=g)))
    print(f"cores {os.cpu_count()}, torch {torch.__version__}, pool {n}, batch {train.TrainConfig.unet_batch}")
    per_step = {"one process": [], "two ranks": []}
    weights = {}
    for r in range(a.repeats):
        for name, ranks in (("one process", 1), ("two ranks", 2)):
            short, _ = _run(ranks, a.threads, a.warm, data)
            long, state = _run(ranks, a.threads, a.warm + a.steps, data)
            per_step[name].append((long - short) / a.steps)
            weights[name] = state
            print(f"repeat {r + 1}: {name:12s} {per_step[name][-1]:.3f} s/step (startup {short - a.warm * per_step[name][-1]:.1f} s)",
                  flush=True)
    ref, new = np.mean(per_step["one process"]), np.mean(per_step["two ranks"])
    n_steps = train.TrainConfig.unet_steps
    w1, w2 = weights["one process"], weights["two ranks"]
    apart = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"one process ({a.threads} threads): {ref:.3f} s/step; two ranks (1 thread each): {new:.3f} s/step; "
          f"speed-up {ref / new:.2f}x; {n_steps:,} steps: {n_steps * ref:.0f} s vs {n_steps * new:.0f} s; "
          f"weights max abs difference {apart:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
