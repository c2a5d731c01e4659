"""Benchmark: peak RAM of ``prepare_data.nsd.prepare_subject`` vs an in-RAM Brain-Diffuser-style preparation.

Writes the NSD test fixture (``tests/fixtures_nsd.make_nsd_fixture``) scaled up so one session's
betas are tens of MB, then runs, each in its own child process (this script with ``--child``):

* ours: ``prepare_subject`` (one session decoded at a time, folded into per-image sums; images copied
  from ``imgBrick`` in chunks into a memory-mapped output);
* reference: the approach of Brain-Diffuser's preparation as method.md §1.3-1.4 describes it, written
  here: ``get_fdata()`` of every session (float64) into one (all trials, V) float32 array, the whole
  ``imgBrick`` read into RAM, float64 averaged fMRI and float64 stimulus arrays saved with ``np.save``
  (trial bookkeeping reuses ``assign_trials``; captions are left out of this one).

Peak memory is the child's peak resident set, VmHWM from /proc/self/status (everything resident:
numpy, nibabel's decompression buffers, pages of the memory-mapped output it touched), next to its
resident set after importing every library the preparation uses, so the increment caused by the
preparation is visible.  VmHWM rather than ``getrusage(RUSAGE_SELF).ru_maxrss``: the latter carries
the parent's high-water mark (here: the whole fixture) across fork + exec.  Reference sizes: one session's int16 beta volume as loaded (X·Y·Z·trials·2 bytes), all
sessions together, and the averaged fMRI the step must return (n_images × V float32).

The fixture's ``nsdgeneral`` ROI covers ~half of the volume; real NSD ROIs cover ~2.25% of it
(subj01: 15,724 of 81×104×83 voxels), so by default the ROI is thinned to ``--roi-fraction`` of the
volume after the fixture is written (``--roi-fraction 0`` keeps the fixture's).

    python benchmarks/nsd_prepare_memory.py                       # 20 sessions × (60,60,50,75) int16 ≈ 27 MB each
    python benchmarks/nsd_prepare_memory.py --trials 150 --sessions 30
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from memory import MB, peak_rss_bytes, rss_now_bytes  # noqa: E402  (benchmarks/memory.py)


def naive_prepare(raw: Path, out: Path, n_sessions: int) -> None:
    """Brain-Diffuser-style preparation of subject 1, everything in RAM (method.md §1.3-1.4)."""
    import h5py
    import nibabel as nib

    from prepare_data import nsd

    design = nsd.load_design(raw / nsd.EXPDESIGN)
    mask = nib.load(raw / nsd.ROI.format(s=1)).get_fdata() > 0
    paths = [raw / nsd.BETAS.format(s=1, n=n) for n in range(1, n_sessions + 1)]
    per = nib.load(paths[0]).shape[3]
    fmri = np.zeros((per * n_sessions, int(mask.sum())), dtype=np.float32)
    for i, path in enumerate(paths):
        beta = nib.load(path).get_fdata()
        fmri[i * per:(i + 1) * per] = beta[mask].T
        del beta
    plan = nsd.assign_trials(design["masterordering"], design["subjectim"][0], len(fmri), design["n_shared"])
    with h5py.File(raw / nsd.STIMULI, "r") as fh:
        brick = fh["imgBrick"][:]
    for split, code in (("train", 0), ("test", 1)):
        ids = plan[split]
        avg = np.zeros((len(ids), fmri.shape[1]))
        stim = np.zeros((len(ids),) + brick.shape[1:])
        for row, nsd_id in enumerate(ids):
            trials = np.flatnonzero((plan["split"] == code) & (plan["row"] == row))
            avg[row] = fmri[sorted(trials)].mean(0)
            stim[row] = brick[nsd_id]
        np.save(out / f"nsd_{split}_fmriavg_nsdgeneral_sub1.npy", avg)
        np.save(out / f"nsd_{split}_stim_sub1.npy", stim)


def child(a) -> None:
    """Run one preparation in this process and write its memory figures to ``a.result``."""
    # every library either preparation uses, imported before the baseline is read
    import h5py  # noqa: F401
    import nibabel  # noqa: F401
    import pandas  # noqa: F401
    import scipy.io  # noqa: F401

    from pipeline import provenance  # noqa: F401
    from prepare_data.nsd import prepare_subject
    base_rss, base_peak = rss_now_bytes(), peak_rss_bytes()
    t = time.perf_counter()
    if a.child == "ours":
        prepare_subject(a.root, a.out, 1, n_sessions=a.sessions, progress=False)
    else:
        naive_prepare(Path(a.root), Path(a.out), a.sessions)
    seconds = time.perf_counter() - t
    Path(a.result).write_text(json.dumps({"rss_after_imports": base_rss, "peak_after_imports": base_peak,
                                          "peak": peak_rss_bytes(), "seconds": seconds}))


def thin_roi(raw: Path, fraction: float, seed: int) -> None:
    """Keep a random ``fraction`` of the volume as nsdgeneral (1), the dropped voxels become cortex (0)."""
    import nibabel as nib

    from prepare_data import nsd

    path = raw / nsd.ROI.format(s=1)
    img = nib.load(path)
    r = np.asarray(img.get_fdata(), dtype=np.float32)
    inside = r > 0
    keep = np.random.default_rng(seed).random(r.shape) < fraction / inside.mean()
    r[inside & ~keep] = 0.0
    nib.save(nib.Nifti1Image(r, img.affine), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(60, 60, 50), metavar=("X", "Y", "Z"))
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--trials", type=int, default=75, help="trials per session (750 in NSD)")
    ap.add_argument("--images", type=int, default=600, help="subject's 10k-list length (>= trials·sessions/3)")
    ap.add_argument("--shared", type=int, default=60, help="shared (test) images among them")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--roi-fraction", type=float, default=0.0225,
                    help="nsdgeneral share of the volume (NSD subj01 ≈ 0.0225); 0 keeps the fixture's ROI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_nsd import make_nsd_fixture

    X, Y, Z = a.shape
    session_bytes = X * Y * Z * a.trials * 2
    with tempfile.TemporaryDirectory(prefix="nsd_prepare_memory_") as tmp:
        raw = Path(tmp) / "raw"
        t = time.perf_counter()
        print(f"writing the fixture: {a.sessions} sessions of {X}×{Y}×{Z}×{a.trials} int16, "
              f"{a.images} images ({a.shared} shared) of {a.image_size} px ...", flush=True)
        truth = make_nsd_fixture(raw, subjects=(1,), n_sessions=a.sessions, trials_per_session=a.trials,
                                 n_images=a.images, n_shared=a.shared, shape=(X, Y, Z),
                                 image_size=a.image_size, seed=a.seed)
        n_pool = len(truth["images"])
        del truth
        if a.roi_fraction > 0:
            thin_roi(raw, a.roi_fraction, a.seed)
        print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)

        res = {}
        for which in ["ours"] + ([] if a.skip_reference else ["reference"]):
            out = Path(tmp) / f"out_{which}"
            out.mkdir()
            result = Path(tmp) / f"{which}.json"
            print(f"running {which} in a child process ...", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", which, "--root", str(raw),
                            "--out", str(out), "--result", str(result), "--sessions", str(a.sessions)],
                           check=True, cwd=ROOT)
            res[which] = json.loads(result.read_text())
            if which == "ours":
                manifest = json.loads((out / "manifest.json").read_text())

    v, n_img = manifest["n_voxels"], manifest["n_train"] + manifest["n_test"]
    all_bytes = session_bytes * a.sessions
    out_bytes = n_img * v * 4
    print(f"{manifest['n_trials']} trials -> {manifest['n_train']} train + {manifest['n_test']} test images, "
          f"{v} nsdgeneral voxels ({v / (X * Y * Z):.2%} of the volume), imgBrick {n_pool} images; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  {'':<44} {'MB':>8} {'× one session':>14} {'× all sessions':>15}")

    def row(label, nbytes):
        print(f"  {label:<44} {nbytes / MB:>8.1f} {nbytes / session_bytes:>14.2f} {nbytes / all_bytes:>15.3f}")

    row("one session's betas in memory (int16)", session_bytes)
    row(f"all {a.sessions} sessions (int16)", all_bytes)
    row("averaged fMRI output (n_images × V float32)", out_bytes)
    labels = {"ours": "prepare_subject", "reference": "BD-style in-RAM"}
    for which, r in res.items():
        row(f"{labels[which]}: child RSS after imports", r["rss_after_imports"])
        row(f"{labels[which]}: peak RSS (VmHWM)", r["peak"])
        row(f"{labels[which]}: increment over imports", r["peak"] - r["rss_after_imports"])
    o = res["ours"]
    inc_o = o["peak"] - o["rss_after_imports"]
    line = (f"PEAK prepare_subject {o['peak'] / MB:.0f} MB (+{inc_o / MB:.0f} MB over imports = "
            f"{inc_o / session_bytes:.2f}× one session, {inc_o / all_bytes:.3f}× all sessions; {o['seconds']:.1f}s)")
    if "reference" in res:
        r = res["reference"]
        inc_r = r["peak"] - r["rss_after_imports"]
        line += (f"; BD-style {r['peak'] / MB:.0f} MB (+{inc_r / MB:.0f} MB, {r['seconds']:.1f}s): "
                 f"increment ratio {inc_r / max(inc_o, 1):.1f}x")
    print(line)


if __name__ == "__main__":
    main()
