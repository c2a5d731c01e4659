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

``--shape nsd`` is the real NSD subject-1 problem instead (n_train 8,859, n_test 982, 15,724
voxels; targets 91,168 + 77×768 + 257×768 float32 as .npy memmaps on disk, 12.3 GB, random data
with low-rank structure), written once by this process into ``--tmp-dir`` and deleted afterwards;
each side then runs in its own child process, reading the same files:

* ours: ``MultiTargetRidge`` with the pipeline's defaults (alphas 5e4 / 1e5 / 6e4, rescaling,
  ``max_memory_gb`` 8, ``solver="auto"``), all 347,680 targets;
* reference: Brain-Diffuser's scikit-learn fits cannot run at that size here (the VDVAE fit alone
  holds 11.5 GB of float64 weights, 24 GB with its dual coefficients and the float64 target
  copy), so four fits are timed — CLIP-text token 0 and CLIP-vision token 0 (768 targets
  each, as the reference's per-token loop fits them) and VDVAE columns 0:1 and 0:8192 — and the
  335 fits (1 VDVAE of 91,168 columns + 77 + 257 tokens of 768) are extrapolated with the cost
  model t(T) = a + b·T (a fixed cost per fit: centring X, the n × n kernel and its solve; b per
  target column), fitted by least squares to the four measurements.

Memory: peak resident ANONYMOUS memory (RssAnon sampled every 20 ms over the method; the memmapped
target pages are file-backed and excluded), next to VmHWM (includes the file pages read).

    python benchmarks/ridge_bench.py --shape nsd              # ~15 min on 2 cores, 12.3 GB in /tmp
    python benchmarks/ridge_bench.py --shape nsd --device cuda
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

from memory import MB, AnonPeak, anon_now_bytes, peak_rss_bytes, rss_now_bytes  # noqa: E402
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


# --------------------------------------------------------------------------- the real NSD shape

NSD_SHAPE = {"n_train": 8859, "n_test": 982, "voxels": 15724,
             "dims": {"vdvae": (91168,), "cliptext": (77, 768), "clipvision": (257, 768)}}
# (group, token or None, columns) fitted and timed with sklearn; the same columns are compared.
# 1 and 8,192 columns span the cost model (the per-column cost is small next to the fixed cost, so
# close sizes let the load of a shared machine swamp it), the two tokens are the reference's own fits.
NSD_REF_FITS = (("vdvae", None, 1), ("cliptext", 0, 768), ("clipvision", 0, 768), ("vdvae", None, 8192))


def nsd_shape(a):
    if not a.tiny:
        return NSD_SHAPE
    # a fast stand-in with the same code path (tests, --dry-run style checks on a laptop)
    return {"n_train": 300, "n_test": 40, "voxels": 500,
            "dims": {"vdvae": (4000,), "cliptext": (7, 64), "clipvision": (9, 64)}}


def write_nsd_data(folder: Path, shape, seed: int, chunk: int = 8192, device: str = "cpu") -> dict:
    """X.npy (n, v) and Xt.npy (m, v) float64, z-scored with the training statistics (ddof=1, as
    ``normalise_fmri``), and one float32 .npy per target group, written column chunk by column
    chunk (rank-32 signal shared with X + noise).  Returns {"seconds", "bytes"}.

    With a CUDA ``device`` the 3 billion target values are drawn on the GPU (numpy's generator is
    single-threaded: minutes on the CPU), so the GPU check stays within its time limit."""
    t = time.perf_counter()
    n, m, v = shape["n_train"], shape["n_test"], shape["voxels"]
    rng = np.random.default_rng(seed)
    rank = 32
    Z = rng.standard_normal((n + m, rank))
    X = np.empty((n + m, v))
    for s in range(0, v, chunk):
        e = min(s + chunk, v)
        X[:, s:e] = Z @ rng.standard_normal((rank, e - s)) * 0.3 + rng.standard_normal((n + m, e - s))
    mean, std = X[:n].mean(0), X[:n].std(0, ddof=1)
    X -= mean
    X /= std
    np.save(folder / "X.npy", X[:n])
    np.save(folder / "Xt.npy", X[n:])
    total = X.nbytes
    del X
    Z32 = Z[:n].astype(np.float32)
    cuda = str(device).startswith("cuda")
    if cuda:
        g = torch.Generator(device=device).manual_seed(seed)
        Zd = torch.from_numpy(Z32).to(device)
    for name, dims in shape["dims"].items():
        T = int(np.prod(dims))
        Y = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n,) + dims)
        flat = Y.reshape(n, T)
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            if cuda:
                block = torch.randn((n, e - s), generator=g, device=device) * 2
                block += Zd @ torch.randn((rank, e - s), generator=g, device=device)
                flat[:, s:e] = block.cpu().numpy()
                continue
            block = rng.standard_normal((n, e - s), dtype=np.float32)
            block *= 2
            block += Z32 @ rng.standard_normal((rank, e - s), dtype=np.float32)
            flat[:, s:e] = block
        Y.flush()
        total += Y.nbytes
        del Y, flat
    return {"seconds": time.perf_counter() - t, "bytes": total}


def _nsd_load(folder: Path, names):
    """X, Xt in RAM (as the ridge step holds them), targets as read-only memmaps."""
    X = np.load(folder / "X.npy")
    Xt = np.load(folder / "Xt.npy")
    targets = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in names}
    return X, Xt, targets


def _ref_columns(Y, token, cols):
    """The (n, cols) block one reference fit regresses: a token of a CLIP group, or VDVAE columns."""
    return Y[:, token] if token is not None else Y.reshape(Y.shape[0], -1)[:, :cols]


def nsd_child(a):
    """One side of ``--shape nsd`` in this process: timings, memory and the compared predictions."""
    if a.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        threadpool_limits(a.threads)
    shape = nsd_shape(a)
    folder, out = Path(a.data), Path(a.out)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    X, Xt, targets = _nsd_load(folder, shape["dims"])
    t_load = time.perf_counter() - t
    anon_base = anon_now_bytes()
    notes, seconds = [], {}
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    if a.only == "ours":
        model = MultiTargetRidge(ALPHAS, device=a.device, dtype=getattr(torch, a.dtype),
                                 max_memory_gb=a.max_memory_gb, rescale=True, progress=False, solver=a.solver)
        cuda = a.device.startswith("cuda")
        MultiTargetRidge(ALPHAS, device=a.device, progress=False).fit_predict(  # first-call overheads, untimed
            X[:64], {k: np.asarray(y[:64, :4]) for k, y in targets.items()}, Xt[:8])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with AnonPeak() as mem:
            t = time.perf_counter()
            model.fit(X, targets)
            if cuda:
                torch.cuda.synchronize()
            seconds["fit"] = time.perf_counter() - t
            t = time.perf_counter()
            pred = model.predict(Xt)
            seconds["predict"] = time.perf_counter() - t
        notes.append(f"decomposition={model.decomposition_} ({model.solver_} form), max_memory_gb={a.max_memory_gb}, "
                     f"device={a.device}, dtype={a.dtype} (targets streamed in float32)")
        if cuda:
            notes.append(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / MB:.0f} MB")
        for i, (name, token, cols) in enumerate(NSD_REF_FITS):
            np.save(out / f"ours_fit{i}.npy", _ref_columns(pred[name], token, cols))
        del pred
    else:
        from sklearn.linear_model import Ridge

        from regression.ridge import rescale_predictions
        Ridge(alpha=1.0).fit(X[:64], np.asarray(targets["vdvae"][:64, :8])).predict(Xt[:8])  # untimed warm-up
        fits = []
        with AnonPeak() as mem:
            for i, (name, token, cols) in enumerate(NSD_REF_FITS):
                # as the reference scripts hold them: VDVAE latents float32, CLIP features float64
                y = np.asarray(_ref_columns(targets[name], token, cols),
                               dtype=np.float32 if name == "vdvae" else np.float64)
                t = time.perf_counter()
                reg = Ridge(alpha=ALPHAS[name], max_iter=10000 if name == "vdvae" else 50000,
                            fit_intercept=True).fit(X, y)
                p = rescale_predictions(reg.predict(Xt).reshape(len(Xt), -1), y.mean(0), y.std(0))
                fits.append((name, token, y.shape[1], time.perf_counter() - t))
                np.save(out / f"reference_fit{i}.npy", p)
                del reg, p, y
        T = np.array([f[2] for f in fits], float)
        secs = np.array([f[3] for f in fits])
        b, a0 = np.polyfit(T, secs, 1)  # t(T) = a0 + b T, least squares
        if b < 0:  # load noise larger than the per-column cost: do not let it shrink the reference
            notes.append(f"least squares gave a negative per-column cost ({b * 1e3:.3f} ms): set to 0 and "
                         f"a to the mean fit time, which understates the reference")
            b, a0 = 0.0, float(secs.mean())
        counts = {"vdvae": (1, int(np.prod(shape["dims"]["vdvae"])))}
        for g in ("cliptext", "clipvision"):
            counts[g] = (shape["dims"][g][0], shape["dims"][g][1])
        for g, (k, cols) in counts.items():
            seconds[g] = k * (a0 + b * cols)
        for name, token, cols, s in fits:
            what = f"token {token}" if token is not None else f"columns 0:{cols}"
            notes.append(f"measured sklearn fit {name} {what} ({cols} targets, alpha {ALPHAS[name]:g}): {s:.1f}s; "
                         f"model {a0 + b * cols:.1f}s")
        notes.append(f"cost model t(T) = a + b*T fitted to the {len(fits)} fits: a = {a0:.2f}s per fit, "
                     f"b = {b * 1e3:.3f} ms per target column")
        notes.append("extrapolated: " + ", ".join(f"{g} {k} fit{'s' if k > 1 else ''} × {cols} columns = "
                                                   f"{seconds[g]:.0f}s" for g, (k, cols) in counts.items()))
        n, p = shape["n_train"], shape["voxels"]
        d = int(np.prod(shape["dims"]["vdvae"]))
        notes.append(f"the VDVAE fit itself is not run: its float64 arrays alone are "
                     f"{(2 * n * d + d * p) * 8 / 2**30:.1f} GiB (targets copy + dual coefficients {n}×{d}, "
                     f"coef_ {d}×{p} = {d * p * 8 / 2**30:.1f} GiB); the anonymous peak below is that of the "
                     f"measured fits")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    (out / f"{a.only}.json").write_text(json.dumps({
        "cpu": ru.ru_utime + ru.ru_stime - cpu0,
        "seconds": seconds, "notes": notes, "load_seconds": t_load, "anon_base": anon_base,
        "anon_peak": mem.peak, "samples": mem.samples, "vmhwm": peak_rss_bytes(),
        "load_before": load0, "load_after": os.getloadavg()[0], "threads": torch.get_num_threads()}))


def nsd_main(a, argv):
    shape = nsd_shape(a)
    dims = shape["dims"]
    n_targets = sum(int(np.prod(d)) for d in dims.values())
    print(f"NSD subject-1 shape{' (--tiny stand-in)' if a.tiny else ''}: n_train={shape['n_train']} "
          f"n_test={shape['n_test']} voxels={shape['voxels']} targets={dims} ({n_targets} columns, float32 "
          f"memmaps) alphas={ALPHAS}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    runs = ["ours"] + ([] if a.skip_reference else ["reference"])
    res = {}
    base = Path(a.tmp_dir)
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ridge_bench_nsd_", dir=base) as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        print(f"writing the data to {data} ...", flush=True)
        info = write_nsd_data(data, shape, a.seed, device=a.device)
        print(f"  {info['bytes'] / 2**30:.1f} GiB in {info['seconds']:.0f}s", flush=True)
        child_argv = [x for x in argv]
        for which in runs:
            print(f"running {which} in a child process ...", flush=True)
            t = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv, "--only", which,
                            "--out", str(tmp), "--data", str(data)], check=True)
            res[which] = json.loads((tmp / f"{which}.json").read_text())
            res[which]["wall"] = time.perf_counter() - t
        preds = {w: [np.load(tmp / f"{w}_fit{i}.npy") for i in range(len(NSD_REF_FITS))] for w in runs}
    print(f"(temporary data deleted: {data})")

    o = res["ours"]
    t_ours = o["seconds"]["fit"] + o["seconds"]["predict"]
    print(f"MultiTargetRidge: {t_ours:.1f}s = fit {o['seconds']['fit']:.1f}s + predict all {n_targets} targets "
          f"{o['seconds']['predict']:.1f}s (loading X, Xt: {o['load_seconds']:.1f}s, not counted)")
    for note in o["notes"]:
        print("  ours:", note)
    worst = None
    if "reference" in res:
        r = res["reference"]
        t_ref = sum(r["seconds"].values())
        print(f"sklearn reference (Brain-Diffuser: 1 VDVAE fit + 77 + 257 per-token fits), EXTRAPOLATED: "
              f"{t_ref:.0f}s")
        for note in r["notes"]:
            print("  reference:", note)
        worst = 0.0
        for i, (name, token, cols) in enumerate(NSD_REF_FITS):
            ref, mine = preds["reference"][i], preds["ours"][i].astype(np.float64)
            rel = float(np.abs(mine - ref).max() / np.abs(ref).max())
            worst = max(worst, rel)
            what = f"token {token}" if token is not None else f"columns 0:{ref.shape[1]}"
            print(f"  {name} {what}: max|ours - sklearn| / max|sklearn| = {rel:.2e}")
    print("memory of each child (RssAnon sampled every 20 ms; VmHWM includes memmapped file pages):")
    print(f"  {'':>18} {'anon after load MB':>19} {'peak anon MB':>13} {'VmHWM MB':>9} {'samples':>8} "
          f"{'CPU s (method)':>15}")
    for w, label in (("ours", "MultiTargetRidge"), ("reference", f"sklearn ({len(NSD_REF_FITS)} fits)")):
        if w in res:
            m = res[w]
            print(f"  {label:>18} {m['anon_base'] / MB:>19.0f} {m['anon_peak'] / MB:>13.0f} "
                  f"{m['vmhwm'] / MB:>9.0f} {m['samples']:>8} {m['cpu']:>15.0f}")
    loads = ", ".join(f"{w} {res[w]['load_before']:.2f} -> {res[w]['load_after']:.2f}" for w in res)
    print(f"load average (1 min) at start -> end of each child: {loads}  "
          f"(> {os.cpu_count()} means other processes competed for the CPUs)")
    line = (f"NSD SHAPE: MultiTargetRidge {t_ours:.1f}s, peak anon {o['anon_peak'] / 2**30:.2f} GiB")
    if "reference" in res:
        line += (f"; reference {t_ref:.0f}s (extrapolated from {len(NSD_REF_FITS)} measured fits), peak anon "
                 f"{r['anon_peak'] / 2**30:.2f} GiB (measured fits); SPEEDUP {t_ref / t_ours:.1f}x; "
                 f"worst relative difference {worst:.1e}")
    print(line)


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
    ap.add_argument("--shape", choices=["default", "nsd"], default="default",
                    help="nsd: the real NSD subject-1 shape with targets memmapped from disk (see above)")
    ap.add_argument("--tmp-dir", default=tempfile.gettempdir(),
                    help="--shape nsd: where the 12.3 GB of temporary data go (deleted afterwards)")
    ap.add_argument("--solver", choices=["auto", "cholesky", "eigh"], default="auto",
                    help="--shape nsd: MultiTargetRidge solver (default auto, as the pipeline)")
    ap.add_argument("--tiny", action="store_true", help="--shape nsd: a small stand-in shape (checks the script)")
    ap.add_argument("--data", help=argparse.SUPPRESS)  # child process, --shape nsd
    ap.add_argument("--only", choices=["reference", "ours"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.shape == "nsd":
        if a.only:
            return nsd_child(a)
        return nsd_main(a, list(sys.argv[1:] if argv is None else argv))
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
