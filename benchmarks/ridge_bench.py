"""Benchmark: Brain-Diffuser's sklearn ridge loops vs MultiTargetRidge (one decomposition).

Reference (method.md §4.2): ``sklearn.linear_model.Ridge(alpha, fit_intercept=True)`` fitted once
for the VDVAE latents and once PER TOKEN for CLIP-text and CLIP-vision, then the post-hoc rescaling
(§4.3).  Timing every token is slow, so by default ``--ref-tokens`` tokens of each CLIP group are
fitted and timed and the group time is extrapolated linearly to all tokens (each token's fit has
the same shapes, so its cost is the same); the output says so.  ``--ref-tokens 0`` times them all.

Random data with realistic shape ratios (NSD: n 8859, test 982, V ≈ 15k, VDVAE 91168 dims,
77×768 and 257×768 CLIP tokens); the defaults are scaled down to run in a few minutes on 2 cores.

    python benchmarks/bench_ridge.py                      # defaults below
    python benchmarks/bench_ridge.py --scale 2            # every size × 2 (token counts kept)
    python benchmarks/bench_ridge.py --device cuda --ref-tokens 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from regression.ridge import MultiTargetRidge, rescale_predictions  # noqa: E402

ALPHAS = {"vdvae": 5e4, "cliptext": 1e5, "clipvision": 6e4}  # method.md §4.2


def make_data(n, n_test, voxels, dims, seed):
    """Normalised X (n+n_test, voxels) float64 and float32 targets with a low-rank linear signal."""
    rng = np.random.default_rng(seed)
    rank = 32
    Z = rng.standard_normal((n + n_test, rank))
    X = Z @ rng.standard_normal((rank, voxels)) * 0.3 + rng.standard_normal((n + n_test, voxels))
    X = (X - X[:n].mean(0)) / X[:n].std(0, ddof=1)
    targets = {}
    for name, shape in dims.items():
        d = int(np.prod(shape))
        Y = (Z[:n] @ rng.standard_normal((rank, d), dtype=np.float32).astype(np.float64)
             + rng.standard_normal((n, d)) * 2).astype(np.float32)
        targets[name] = Y.reshape((n,) + shape)
    return X[:n], X[n:], targets


def reference(X, Xt, targets, ref_tokens):
    """sklearn as in the reference scripts; returns ({group: predictions of the fitted part}, seconds)."""
    from sklearn.linear_model import Ridge

    preds, seconds, notes = {}, {}, []
    # VDVAE: one multi-output fit
    Y = targets["vdvae"]
    t = time.perf_counter()
    p = Ridge(alpha=ALPHAS["vdvae"], fit_intercept=True).fit(X, Y).predict(Xt)
    preds["vdvae"] = rescale_predictions(p, Y.mean(0), Y.std(0))
    seconds["vdvae"] = time.perf_counter() - t
    # CLIP groups: one fit per token
    for name in ("cliptext", "clipvision"):
        Y = targets[name]
        n_tok = Y.shape[1]
        k = n_tok if ref_tokens <= 0 else min(ref_tokens, n_tok)
        out = []
        t = time.perf_counter()
        for tok in range(k):
            y = Y[:, tok]
            p = Ridge(alpha=ALPHAS[name], fit_intercept=True).fit(X, y).predict(Xt)
            out.append(rescale_predictions(p, y.mean(0), y.std(0)))
        el = time.perf_counter() - t
        seconds[name] = el * n_tok / k
        preds[name] = np.stack(out, axis=1)
        if k < n_tok:
            notes.append(f"{name}: timed {k}/{n_tok} tokens ({el:.1f}s), extrapolated linearly "
                         f"to {seconds[name]:.1f}s")
    return preds, seconds, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--voxels", type=int, default=6000)
    ap.add_argument("--vdvae-dims", type=int, default=10000)
    ap.add_argument("--clip-dim", type=int, default=64, help="embedding width (768 in the real model)")
    ap.add_argument("--text-tokens", type=int, default=77)
    ap.add_argument("--vision-tokens", type=int, default=257)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply n-train, n-test, voxels, dims")
    ap.add_argument("--ref-tokens", type=int, default=8,
                    help="CLIP tokens fitted with sklearn per group, then extrapolated (0 = all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--max-memory-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true")
    a = ap.parse_args(argv)

    s = a.scale
    n, nt, v = int(a.n_train * s), int(a.n_test * s), int(a.voxels * s)
    dims = {"vdvae": (int(a.vdvae_dims * s),), "cliptext": (a.text_tokens, int(a.clip_dim * s)),
            "clipvision": (a.vision_tokens, int(a.clip_dim * s))}
    print(f"n_train={n} n_test={nt} voxels={v} targets={dims} alphas={ALPHAS}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device={a.device}, dtype={a.dtype}")
    X, Xt, targets = make_data(n, nt, v, dims, a.seed)

    model = MultiTargetRidge(ALPHAS, device=a.device, dtype=getattr(torch, a.dtype),
                             max_memory_gb=a.max_memory_gb, rescale=True, progress=False)
    if a.device.startswith("cuda"):  # warm up kernels/allocator once
        MultiTargetRidge(ALPHAS, device=a.device, progress=False).fit_predict(
            X[:64], {k: y[:64] for k, y in targets.items()}, Xt[:8])
        torch.cuda.synchronize()
    t = time.perf_counter()
    model.fit(X, targets)
    t_fit = time.perf_counter() - t
    pred = model.predict(Xt)
    t_ours = time.perf_counter() - t
    print(f"MultiTargetRidge: {t_ours:.2f}s total (fit/decomposition {t_fit:.2f}s, "
          f"predict all {sum(np.prod(d) for d in dims.values())} targets {t_ours - t_fit:.2f}s)")
    if a.skip_reference:
        return

    ref, secs, notes = reference(X, Xt, targets, a.ref_tokens)
    t_ref = sum(secs.values())
    for note in notes:
        print("  reference", note)
    print("sklearn reference: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items())
          + f"  -> total {t_ref:.1f}s")
    worst = 0.0
    for name, r in ref.items():
        ours = pred[name][:, : r.shape[1]] if r.ndim == 3 else pred[name]
        rel = float(np.abs(ours.astype(np.float64) - r).max() / np.abs(r).max())
        worst = max(worst, rel)
        print(f"  {name}: max|ours - sklearn| / max|sklearn| = {rel:.2e}")
    print(f"SPEEDUP {t_ref / t_ours:.1f}x  (reference {t_ref:.1f}s vs MultiTargetRidge {t_ours:.2f}s; "
          f"worst relative prediction difference {worst:.1e})")


if __name__ == "__main__":
    main()
