"""Benchmark: Brain-Diffuser's sklearn ridge loops vs MultiTargetRidge (one decomposition): time and peak RAM.

Reference (method.md §4.2): ``sklearn.linear_model.Ridge(alpha, fit_intercept=True)`` fitted once
for the VDVAE latents and once PER TOKEN for CLIP-text and CLIP-vision, then the post-hoc rescaling
(§4.3).  Timing every token is slow, so by default ``--ref-tokens`` tokens of each CLIP group are
fitted and timed, and each group's time is extrapolated linearly as (its token count) × (median
time of one token fit over all timed tokens): every token fit has the same shapes, so the same
cost, and the median shrugs off bursts of load on a shared machine; the output says so and also
gives the plain per-group extrapolation.  ``--ref-tokens 0`` times every token.

Peak memory: each approach runs in its own child process (this script with ``--only reference|ours``),
which generates the same seeded data, runs, and reports its peak resident set, VmHWM from
/proc/self/status (numpy, BLAS and torch allocations alike; tracemalloc would miss torch's), and its
resident set after imports + data generation, so the increment caused by the method is visible.
VmHWM rather than ``getrusage(RUSAGE_SELF).ru_maxrss``: the latter carries the parent's high-water
mark across fork + exec.  Targets are generated column chunk by column chunk straight into float32
arrays, so data generation never peaks above the data itself.  The arrays have the real shapes even
when only some tokens are timed: a per-token fit's working memory does not depend on how many
tokens are fitted.  Not included: the per-token weight arrays Brain-Diffuser also keeps in RAM to
pickle them (``reg_w``, (tokens, dim, voxels) float32; their size is printed as a note).

Default problem: 1,000 train / 100 test images, 4,000 voxels, a VDVAE-sized block (91,168 latent
dims, as the real 31-layer VDVAE) and 77 + 257 CLIP tokens × 768, random data with a low-rank
linear signal.  NSD is n 8859, test 982, V ≈ 15k.

    python benchmarks/ridge_bench.py                      # defaults, about 2-3 minutes on 2 cores
    python benchmarks/ridge_bench.py --threads 1          # steadier on a loaded shared CPU
    python benchmarks/ridge_bench.py --scale 2            # n, voxels, VDVAE dims × 2 (tokens kept)
    python benchmarks/ridge_bench.py --ref-tokens 0       # fit every token with sklearn (slow)
    python benchmarks/ridge_bench.py --device cuda --dtype float32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import MB, peak_rss_bytes, rss_now_bytes  # noqa: E402  (benchmarks/memory.py)
from regression.ridge import MultiTargetRidge, rescale_predictions  # noqa: E402

ALPHAS = {"vdvae": 5e4, "cliptext": 1e5, "clipvision": 6e4}  # method.md §4.2


def make_data(n, n_test, voxels, dims, seed, chunk=8192):
    """Normalised X (n, voxels), Xt (n_test, voxels) float64 and float32 targets {group: (n, *shape)}.

    Targets carry a rank-32 linear signal plus noise; they are written chunk by chunk of columns in
    float32 so the temporary memory stays ~n × chunk × 8 bytes.
    """
    rng = np.random.default_rng(seed)
    rank = 32
    Z = rng.standard_normal((n + n_test, rank))
    X = Z @ rng.standard_normal((rank, voxels)) * 0.3 + rng.standard_normal((n + n_test, voxels))
    X = (X - X[:n].mean(0)) / X[:n].std(0, ddof=1)
    targets = {}
    for name, shape in dims.items():
        d = int(np.prod(shape))
        Y = np.empty((n, d), np.float32)
        for s in range(0, d, chunk):
            e = min(s + chunk, d)
            Y[:, s:e] = Z[:n] @ rng.standard_normal((rank, e - s)) + 2 * rng.standard_normal((n, e - s))
        targets[name] = Y.reshape((n,) + shape)
    return X[:n].copy(), X[n:].copy(), targets


def reference(X, Xt, targets, ref_tokens):
    """sklearn as in the reference scripts: ({group: rescaled predictions of the fitted part}, seconds, notes)."""
    from sklearn.linear_model import Ridge

    preds, seconds, notes = {}, {}, []
    Ridge(alpha=1.0).fit(X[:64], targets["vdvae"][:64, :8]).predict(Xt[:8])  # first-call overheads, untimed
    # VDVAE: one multi-output fit
    Y = targets["vdvae"]
    t = time.perf_counter()
    reg = Ridge(alpha=ALPHAS["vdvae"], fit_intercept=True).fit(X, Y)
    p = reg.predict(Xt)
    preds["vdvae"] = rescale_predictions(p, Y.mean(0), Y.std(0))
    seconds["vdvae"] = time.perf_counter() - t
    del reg, p
    # CLIP groups: one fit per token
    per_token, counts, sums = [], {}, {}
    for name in ("cliptext", "clipvision"):
        Y = targets[name]
        n_tok = Y.shape[1]
        k = n_tok if ref_tokens <= 0 else min(ref_tokens, n_tok)
        out, times = [], []
        for tok in range(k):
            t = time.perf_counter()
            y = Y[:, tok]
            p = Ridge(alpha=ALPHAS[name], fit_intercept=True).fit(X, y).predict(Xt)
            out.append(rescale_predictions(p, y.mean(0), y.std(0)))
            times.append(time.perf_counter() - t)
        per_token += times
        counts[name], sums[name] = (k, n_tok), sum(times)
        preds[name] = np.stack(out, axis=1)
    # Every token fit has the same shapes (X (n, p), y (n, dim)), hence the same cost: the pooled
    # median per-token time is extrapolated, robust to bursts of load on a shared machine.
    med = float(np.median(per_token))
    for name, (k, n_tok) in counts.items():
        if k == n_tok:
            seconds[name] = sums[name]
        else:
            seconds[name] = med * n_tok
            notes.append(f"{name}: timed {k}/{n_tok} tokens ({sums[name]:.1f}s), extrapolated to {seconds[name]:.1f}s "
                         f"(= {n_tok} × pooled median; from this group's own mean it would be "
                         f"{sums[name] * n_tok / k:.1f}s)")
    if any(k < n for k, n in counts.values()):
        notes.append(f"per-token fit+predict time over {len(per_token)} fits: min {min(per_token):.3f}s, "
                     f"median {med:.3f}s, max {max(per_token):.3f}s")
    return preds, seconds, notes


def ours(X, Xt, targets, a):
    """MultiTargetRidge on all groups: ({group: predictions}, {"fit": s, "predict": s}, notes)."""
    model = MultiTargetRidge(ALPHAS, device=a.device, dtype=getattr(torch, a.dtype),
                             max_memory_gb=a.max_memory_gb, rescale=True, progress=False)
    cuda = a.device.startswith("cuda")
    # first-call overheads (kernels, allocator) untimed, like the reference's warm-up fit
    MultiTargetRidge(ALPHAS, device=a.device, dtype=getattr(torch, a.dtype), progress=False).fit_predict(
        X[:64], {k: y[:64, :8] for k, y in targets.items()}, Xt[:8])
    if cuda:  # measure device memory from here
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model.fit(X, targets)
    if cuda:
        torch.cuda.synchronize()
    t_fit = time.perf_counter() - t
    pred = model.predict(Xt)
    t_all = time.perf_counter() - t
    notes = [f"max_memory_gb={a.max_memory_gb} (per-chunk budget), solver={model.solver_}"]
    if cuda:
        notes.append(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / MB:.0f} MB")
    return pred, {"fit": t_fit, "predict": t_all - t_fit}, notes


def problem(a):
    s = a.scale
    n, nt, v = int(a.n_train * s), int(a.n_test * s), int(a.voxels * s)
    dims = {"vdvae": (int(a.vdvae_dims * s),), "cliptext": (a.text_tokens, a.clip_dim),
            "clipvision": (a.vision_tokens, a.clip_dim)}
    return n, nt, v, dims


def child(a):
    """Run one approach in this process; write timings, memory and predictions to ``a.out``."""
    if a.threads:  # torch (MKL/OpenMP) and numpy/scipy's OpenBLAS alike
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        threadpool_limits(a.threads)
    n, nt, v, dims = problem(a)
    X, Xt, targets = make_data(n, nt, v, dims, a.seed)
    base_rss, base_peak = rss_now_bytes(), peak_rss_bytes()
    data_bytes = X.nbytes + Xt.nbytes + sum(y.nbytes for y in targets.values())
    if a.only == "reference":
        pred, seconds, notes = reference(X, Xt, targets, a.ref_tokens)
    else:
        pred, seconds, notes = ours(X, Xt, targets, a)
    peak = peak_rss_bytes()
    out = Path(a.out)
    k = None if a.ref_tokens <= 0 else a.ref_tokens
    for name, p in pred.items():  # only the part both approaches computed is compared
        np.save(out / f"{a.only}_{name}.npy", p if p.ndim == 2 else p[:, :k])
    (out / f"{a.only}.json").write_text(json.dumps({
        "seconds": seconds, "notes": notes, "rss_after_data": base_rss, "peak_after_data": base_peak,
        "peak": peak, "data_bytes": data_bytes}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--voxels", type=int, default=4000)
    ap.add_argument("--vdvae-dims", type=int, default=91168, help="91168 = the real VDVAE's 31 layers")
    ap.add_argument("--clip-dim", type=int, default=768, help="embedding width (768 in the real model)")
    ap.add_argument("--text-tokens", type=int, default=77)
    ap.add_argument("--vision-tokens", type=int, default=257)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply n-train, n-test, voxels, vdvae dims")
    ap.add_argument("--ref-tokens", type=int, default=16,
                    help="CLIP tokens fitted with sklearn per group, then extrapolated (0 = all)")
    ap.add_argument("--device", default="cpu", help="device of MultiTargetRidge (sklearn is CPU only)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="MultiTargetRidge budget (pipeline default 8)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch and BLAS in both children (default: "
                    "the libraries' own); on a loaded shared CPU, 1 avoids oversubscription stalls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--only", choices=["reference", "ours"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.only:
        return child(a)

    n, nt, v, dims = problem(a)
    print(f"n_train={n} n_test={nt} voxels={v} targets={dims} alphas={ALPHAS}")
    print(f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; MultiTargetRidge on "
          f"device={a.device} dtype={a.dtype}; sklearn on CPU float64")
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = ["ours"] + ([] if a.skip_reference else ["reference"])
    res = {}
    with tempfile.TemporaryDirectory(prefix="ridge_bench_") as tmp:
        for which in runs:
            print(f"running {which} in a child process ...", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--only", which,
                            "--out", tmp], check=True)
            res[which] = json.loads((Path(tmp) / f"{which}.json").read_text())
        preds = {w: {name: np.load(Path(tmp) / f"{w}_{name}.npy") for name in dims} for w in runs}

    o = res["ours"]
    t_ours = sum(o["seconds"].values())
    print(f"MultiTargetRidge: {t_ours:.2f}s (fit/decomposition {o['seconds']['fit']:.2f}s, "
          f"predict all {sum(int(np.prod(d)) for d in dims.values())} targets {o['seconds']['predict']:.2f}s)")
    for note in o["notes"]:
        print("  ours:", note)
    if not a.skip_reference:
        r = res["reference"]
        t_ref = sum(r["seconds"].values())
        for note in r["notes"]:
            print("  reference", note)
        print("sklearn reference: " + ", ".join(f"{k} {s:.1f}s" for k, s in r["seconds"].items())
              + f"  -> total {t_ref:.1f}s")
        worst = 0.0
        for name in dims:
            ref, mine = preds["reference"][name], preds["ours"][name].astype(np.float64)
            rel = float(np.abs(mine - ref).max() / np.abs(ref).max())
            worst = max(worst, rel)
            print(f"  {name}: max|ours - sklearn| / max|sklearn| = {rel:.2e}"
                  + (f"  (first {ref.shape[1]} tokens)" if ref.ndim == 3 and ref.shape[1] < dims[name][0] else ""))

    print("peak memory (VmHWM of each child process; 'after data' = resident after imports + data):")
    print(f"  {'':>18} {'after data MB':>14} {'peak MB':>9} {'increment MB':>13}")
    for w, label in (("reference", "sklearn reference"), ("ours", "MultiTargetRidge")):
        if w not in res:
            continue
        m = res[w]
        print(f"  {label:>18} {m['rss_after_data'] / MB:>14.0f} {m['peak'] / MB:>9.0f} "
              f"{(m['peak'] - m['rss_after_data']) / MB:>13.0f}")
        if m["peak"] <= m["peak_after_data"]:
            print(f"  note: {label}'s peak was reached during data generation; its method peak is hidden")
    print(f"  data arrays (X, Xt, targets): {o['data_bytes'] / MB:.0f} MB in each process")
    w_mb = sum(dims[g][0] * dims[g][1] * v * 4 for g in ("cliptext", "clipvision")) / MB
    print(f"  not included: Brain-Diffuser also keeps per-token weights reg_w in RAM (float32): {w_mb:.0f} MB")
    if a.skip_reference:
        return
    inc_r = r["peak"] - r["rss_after_data"]
    inc_o = o["peak"] - o["rss_after_data"]
    print(f"SPEEDUP {t_ref / t_ours:.1f}x  (reference {t_ref:.1f}s vs MultiTargetRidge {t_ours:.2f}s); "
          f"PEAK RSS {r['peak'] / MB:.0f} MB vs {o['peak'] / MB:.0f} MB ({r['peak'] / o['peak']:.2f}x; "
          f"increment over data {inc_r / MB:.0f} vs {inc_o / MB:.0f} MB = {inc_r / max(inc_o, 1):.1f}x); "
          f"worst relative prediction difference {worst:.1e}")


if __name__ == "__main__":
    main()
