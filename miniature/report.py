"""The demo's metrics next to their chance level (README table), optionally with the shuffled-fMRI control.

    python -m miniature.report                     # after `make demo`: markdown table on stdout
    python -m miniature.report --shuffled          # + the same runs with the test fMRI rows shuffled
    python -m miniature.report --grid docs/demo_grid.png   # + copy subject 1's grid for the README

Chance level: 50 % for the two-way identifications; for PixCorr, SSIM, EffNet-B and SwAV the
"unrelated image" baseline, i.e. each reconstruction scored against another test image's ground
truth (the next one), with the same evaluation networks.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from evaluation.metrics import IDENTIFICATION_METRICS, METRICS
from pipeline.config import BASE_VARIANT

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def _run_dir(results: Path, sub: str) -> Path:
    return results / "synthetic" / f"sub{sub}" / BASE_VARIANT


def unrelated_baseline(results: Path, data: Path, sub: str) -> dict[str, float]:
    from evaluation.metrics import compute_metrics
    from models.eval_networks import load_eval_networks
    from reconstruct.versatile import load_init_images

    d = _run_dir(results, sub) / "images" / "versatile"
    recons = load_init_images(sorted(d.glob("*.png")))
    gts = np.load(data / "synthetic" / f"sub{sub}" / f"test_stim_sub{sub}.npy")
    nets = load_eval_networks(None, "cpu", tiny=True)
    res = compute_metrics(recons, np.roll(gts, 1, axis=0), nets, progress=False)
    return {m: (0.5 if m in IDENTIFICATION_METRICS else res[m]) for m in METRICS}


def shuffled_control(results: Path, data: Path, sub: str) -> dict[str, float]:
    """Copy the run, shuffle the test fMRI rows (seed 0), redo ridge → evaluate; return its metrics."""
    from pipeline.cli import dataset_main

    with tempfile.TemporaryDirectory(prefix="shuffled-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(data / "synthetic" / f"sub{sub}", tmp / "data" / "synthetic" / f"sub{sub}")
        shutil.copytree(_run_dir(results, sub), _run_dir(tmp / "res", sub))
        p = tmp / "data" / "synthetic" / f"sub{sub}" / f"test_fmriavg_general_sub{sub}.npy"
        x = np.load(p)
        np.save(p, x[np.random.default_rng(0).permutation(len(x))])
        code = dataset_main("synthetic", ["--config", str(CONFIG), "--subject", sub, "--no-progress", "--from", "ridge",
                                          "--data-dir", str(tmp / "data"), "--results-dir", str(tmp / "res")])
        if code:
            raise SystemExit(code)
        return json.loads((_run_dir(tmp / "res", sub) / "eval" / "metrics.json").read_text())["reconstruction"]["versatile"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m miniature.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="demo_output/results")
    p.add_argument("--data", default="demo_output/data")
    p.add_argument("--subjects", nargs="+", default=["1", "2"])
    p.add_argument("--shuffled", action="store_true", help="add the shuffled-test-fMRI control (reruns ridge → evaluate)")
    p.add_argument("--grid", help="copy subject 1's eval/grid.png here")
    a = p.parse_args(argv)
    results, data = Path(a.results), Path(a.data)
    cols: dict[str, dict] = {}
    decoder: dict[str, dict] = {}
    for sub in a.subjects:
        rec = json.loads((_run_dir(results, sub) / "eval" / "metrics.json").read_text())
        cols[f"sub{sub} Versatile"] = rec["reconstruction"]["versatile"]
        if "vdvae" in rec["reconstruction"]:
            cols[f"sub{sub} VDVAE init"] = rec["reconstruction"]["vdvae"]
        decoder[sub] = rec["decoder"]
    chance = {sub: unrelated_baseline(results, data, sub) for sub in a.subjects}
    cols = {"chance / unrelated": {m: float(np.mean([chance[s][m] for s in a.subjects])) for m in METRICS}, **cols}
    if a.shuffled:
        for sub in a.subjects:
            cols[f"sub{sub} shuffled fMRI"] = shuffled_control(results, data, sub)
    fmt = lambda m, v: f"{100 * v:.1f} %" if m in IDENTIFICATION_METRICS else f"{v:.3f}"  # noqa: E731
    print("| metric | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for m in METRICS:
        arrow = "↓" if m in ("EffNet-B", "SwAV") else "↑"
        print(f"| {m} {arrow} | " + " | ".join(fmt(m, c[m]) for c in cols.values()) + " |")
    print()
    print("| decoder (test set) | " + " | ".join(f"sub{s} {t}" for s in a.subjects for t in ("vdvae", "cliptext", "clipvision")) + " |")
    print("|---|" + "---|" * (3 * len(a.subjects)))
    for key in ("pattern_correlation", "profile_correlation", "identification_accuracy"):
        print(f"| {key} | " + " | ".join(f"{decoder[s][t][key]:.3f}" for s in a.subjects
                                        for t in ("vdvae", "cliptext", "clipvision")) + " |")
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_run_dir(results, a.subjects[0]) / "eval" / "grid.png", a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
