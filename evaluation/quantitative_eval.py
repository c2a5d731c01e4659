"""Step 6, ``evaluate``, and the command that tabulates any set of runs.

As a step, for one run (subject × variant): the eight metrics of every image set present
(``versatile``, ``vdvae``, ``icnn``) against the test images, in the configured profile, plus the
decoder metrics of every predicted target; writes ``eval/metrics.{csv,json}``, per-image CSVs,
a bar plot and an image grid.

As a command, over many runs selected by glob (no uncommenting)::

    python -m evaluation.quantitative_eval --dataset nsd --runs 'sub*/base' 'sub*/dropout*'
    python -m evaluation.quantitative_eval --dataset synthetic --config configs/demo.toml \\
        --runs 'sub*/*' --compare base random_fraction-0.5_draw-0

evaluates the runs not yet evaluated and writes one table across subjects and variants
(mean ± s.e.m.), bar plots, and paired t-tests between two variants across subjects under
``<results_dir>/<dataset>/summary/``.
"""
from __future__ import annotations

import csv
import fnmatch
import logging
import os
import sys
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.common_format import part_path, read_split
from pipeline.errors import UserError
from pipeline.layout import TARGETS

log = logging.getLogger("recon")
IMAGE_KINDS = ("versatile", "vdvae", "icnn")


def _recon_paths(layout, kind: str, n: int) -> list[Path] | None:
    paths = [layout.image(kind, i) for i in range(n)]
    return paths if all(p.is_file() for p in paths) else None


def _decoder_metrics(layout) -> dict:
    from evaluation.decoder_metrics import evaluate_decoder

    out = {}
    for target in TARGETS:
        pred_path, true_path = layout.prediction(target), layout.base.features(target, "test")
        if not (pred_path.is_file() and true_path.is_file()):
            continue
        pred = io.load_npy(pred_path)
        true = io.load_npy(true_path)
        scores = evaluate_decoder(pred.reshape(len(pred), -1), true.reshape(len(true), -1))
        out[target] = {k: float(v) for k, v in scores.items()
                       if k in ("pattern_correlation", "profile_correlation", "identification_accuracy")}
    return out


def _gt_features(ctx, gts: np.ndarray, networks: dict) -> dict[str, np.ndarray]:
    """Network features of the test images, cached once per subject and profile (every variant
    of a subject shares the test set); the cache is keyed by the images and the weights used."""
    import hashlib
    import json

    from evaluation.metrics import extract_features
    from pipeline.digests import DigestCache

    e = ctx.cfg.evaluate
    key = json.dumps({"profile": e.profile, "weights": {k: getattr(v, "weights", "") for k, v in networks.items()},
                      "stim": DigestCache().digest(part_path(ctx.layout.base.data_dir, "test", "stim", ctx.subject))},
                     sort_keys=True)
    path = ctx.layout.gt_features(e.profile, hashlib.sha256(key.encode()).hexdigest()[:16])
    if path.is_file() and not ctx.force:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    feats = extract_features(gts, networks, profile=e.profile, batch_size=e.batch_size, progress=ctx.progress)
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **feats)
    return feats


def run(ctx) -> None:
    from evaluation.metrics import METRICS, compute_metrics
    from models.eval_networks import load_eval_networks
    from evaluation.qualitative_eval import save_grid

    cfg, layout, e = ctx.cfg, ctx.layout, ctx.cfg.evaluate
    gts = read_split(layout.base.data_dir, "test", ctx.subject, parts=("stim",)).stim
    n = len(gts)
    kinds = {k: p for k in e.images if (p := _recon_paths(layout, k, n))}
    if "icnn" not in e.images and (p := _recon_paths(layout, "icnn", n)):
        kinds["icnn"] = p
    if not kinds:
        raise UserError(f"{layout.images('versatile')}: no complete set of {n} reconstructions to evaluate")
    networks = load_eval_networks(cfg.paths.weights_dir, ctx.device, tiny=cfg.run.tiny_models, profile=e.profile)
    gt_features = _gt_features(ctx, np.asarray(gts), networks)
    results, rows = {}, []
    for kind, paths in kinds.items():
        res = compute_metrics(paths, np.asarray(gts), networks, profile=e.profile, batch_size=e.batch_size,
                              gt_features=gt_features, progress=ctx.progress)
        per_image = res.pop("per_image")
        results[kind] = res
        rows.append({"images": kind, **{m: res[m] for m in METRICS if m in res},
                     **({"DreamSim": res["DreamSim"]} if "DreamSim" in res else {})})
        _write_csv(layout.per_image_metrics(kind),
                   [{"image": i, **{m: float(v[i]) for m, v in per_image.items()}} for i in range(n)])
    decoder = _decoder_metrics(layout)
    record = {"dataset": cfg.run.dataset, "subject": ctx.subject, "variant": ctx.variant, "profile": e.profile,
              "n_images": n, "reconstruction": results, "decoder": decoder}
    io.save_json(layout.metrics("json"), record)
    _write_csv(layout.metrics("csv"), [{"profile": e.profile, **r} for r in rows])
    _bar_plot(layout.metrics("png"), rows, f"sub{ctx.subject} / {ctx.variant} ({e.profile})")
    rows = {"vdvae init": init} if "vdvae" not in kinds and (init := _recon_paths(layout, "vdvae", n)) else {}
    save_grid(layout.eval_grid(), np.asarray(gts), {**rows, **kinds}, max_images=8)
    for kind, res in results.items():
        log.info("[evaluate] sub%s/%s %s: %s", ctx.subject, ctx.variant, kind,
                 ", ".join(f"{m} {res[m]:.3f}" for m in METRICS if m in res))


def outputs(ctx) -> list[Path]:
    layout = ctx.layout
    return [layout.metrics("json"), layout.metrics("csv"), layout.metrics("png"), layout.eval_grid()]


def inputs(ctx) -> list[Path]:
    layout = ctx.layout
    return ([part_path(layout.base.data_dir, "test", "stim", ctx.subject)]
            + [layout.images(k) for k in IMAGE_KINDS if layout.images(k).is_dir()]
            + [layout.prediction(t) for t in TARGETS])


# ---------------------------------------------------------------------------------------------
# tables and plots


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _bar_plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.metrics import HIGHER_IS_BETTER

    metrics = [m for m in HIGHER_IS_BETTER if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.0 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        names = [r["images"] for r in rows if m in r]
        ax.bar(names, [r[m] for r in rows if m in r], color=["C0", "C1", "C2"][: len(names)])
        ax.set_title(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    io.save_figure(path, fig)


def collect(results_root: Path, patterns: list[str]) -> list[dict]:
    """Every ``eval/metrics.json`` under ``results_root`` whose ``sub*/variant`` matches a pattern."""
    records = []
    for path in sorted(results_root.glob("sub*/*/eval/metrics.json")):
        run_name = f"{path.parent.parent.parent.name}/{path.parent.parent.name}"
        if any(fnmatch.fnmatch(run_name, p) for p in patterns):
            records.append(io.load_json(path))
    return records


def long_table(records: list[dict]) -> list[dict]:
    """One row per (subject, variant, image set, metric) — reconstruction and decoder metrics."""
    rows = []
    for r in records:
        for kind, res in r["reconstruction"].items():
            for m, v in res.items():
                if isinstance(v, (int, float)) and m != "n_images":
                    rows.append({"subject": r["subject"], "variant": r["variant"], "images": kind, "metric": m,
                                 "value": float(v), "profile": r["profile"]})
        for target, scores in r.get("decoder", {}).items():
            for m, v in scores.items():
                rows.append({"subject": r["subject"], "variant": r["variant"], "images": f"decoder:{target}",
                             "metric": m, "value": float(v), "profile": r["profile"]})
    return rows


def summary_table(rows: list[dict]) -> list[dict]:
    """Mean ± s.e.m. across subjects per (variant, image set, metric)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["images"], r["metric"]), []).append(r["value"])
    out = []
    for (variant, images, metric), values in sorted(groups.items()):
        v = np.asarray(values, dtype=float)
        sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        out.append({"variant": variant, "images": images, "metric": metric, "mean": float(v.mean()),
                    "sem": sem, "n_subjects": len(v)})
    return out


def paired_tests(rows: list[dict], a: str, b: str) -> list[dict]:
    """Paired t-tests of variant ``a`` vs ``b`` across subjects, per (image set, metric)."""
    from scipy.stats import ttest_rel

    by = {}
    for r in rows:
        by.setdefault((r["images"], r["metric"]), {}).setdefault(r["variant"], {})[r["subject"]] = r["value"]
    out = []
    for (images, metric), variants in sorted(by.items()):
        if a not in variants or b not in variants:
            continue
        subjects = sorted(set(variants[a]) & set(variants[b]))
        if len(subjects) < 2:
            continue
        x = np.array([variants[a][s] for s in subjects])
        y = np.array([variants[b][s] for s in subjects])
        t, p = ttest_rel(x, y)
        out.append({"images": images, "metric": metric, "a": a, "b": b, "mean_a": float(x.mean()),
                    "mean_b": float(y.mean()), "t": float(t), "p": float(p), "n_subjects": len(subjects)})
    return out


DECODER_METRICS = ("identification_accuracy", "pattern_correlation", "profile_correlation")


def summary_plot(path: Path, summary: list[dict], images: str = "versatile") -> None:
    """One panel per metric: bars of mean ± s.e.m. across subjects for every variant
    (``images`` = an image set, or ``decoder:<target>`` for the decoder metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.metrics import HIGHER_IS_BETTER

    arrows = {m: "↑" for m in DECODER_METRICS} | {m: "↑" if up else "↓" for m, up in HIGHER_IS_BETTER.items()}
    rows = [r for r in summary if r["images"] == images and r["metric"] in arrows]
    metrics = [m for m in arrows if any(r["metric"] == m for r in rows)]
    if not metrics:
        return
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    label_room = 0.055 * max(len(v) for v in variants)  # rotated variant names need height
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(2.6 * len(metrics), 6), 2.6 + label_room),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = {r["variant"]: r for r in rows if r["metric"] == m}
        ax.bar(range(len(variants)), [vals[v]["mean"] if v in vals else np.nan for v in variants],
               yerr=[vals[v]["sem"] if v in vals else 0 for v in variants], color="C0", capsize=2)
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{m} {arrows[m]}", fontsize=9)
    fig.suptitle(f"{images}: mean ± s.e.m. across subjects", fontsize=10)
    fig.tight_layout()
    io.save_figure(path, fig)


def write_summary(out_dir: Path, records: list[dict], compare: tuple[str, str] | None = None,
                  rows: list[dict] | None = None) -> Path:
    """Long table, summary (mean ± s.e.m.), plots and optional paired tests of ``records``;
    ``rows``: the long table of ``records`` when the caller has already built (and annotated) it."""
    rows = long_table(records) if rows is None else rows
    summary = summary_table(rows)
    _write_csv(out_dir / "metrics_long.csv", rows)
    _write_csv(out_dir / "metrics_summary.csv", summary)
    io.save_json(out_dir / "metrics_summary.json", {"runs": [f"sub{r['subject']}/{r['variant']}" for r in records],
                                                    "summary": summary})
    for kind in sorted({r["images"] for r in rows}):
        summary_plot(out_dir / f"metrics_{kind.replace(':', '_')}.png", summary, kind)
    if compare:
        tests = paired_tests(rows, *compare)
        _write_csv(out_dir / f"paired_{compare[0]}_vs_{compare[1]}.csv", tests)
        for t in tests:
            if not t["images"].startswith("decoder:"):
                print(f"{t['images']:<10} {t['metric']:<11} {t['a']} {t['mean_a']:.4f} vs {t['b']} "
                      f"{t['mean_b']:.4f}  t={t['t']:.3f} p={t['p']:.4f} (n={t['n_subjects']})")
    return out_dir


def main(argv=None) -> int:
    from pipeline.cli import build_parser, config_from_args, guarded, setup_logging
    from pipeline.config import DATASET_NAMES
    from pipeline.layout import Layout, dataset_results, summary_dir
    from pipeline.runner import Context, resolve_device, run_step, step_spec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser(None, prog="python -m evaluation.quantitative_eval", steps=False)
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--runs", nargs="+", default=["sub*/base"], metavar="GLOB",
                        help="runs as sub<subject>/<variant> globs (default: sub*/base)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired t-test of variant A vs B")
    parser.add_argument("--force", action="store_true", help="re-evaluate runs already evaluated")
    parser.add_argument("--out", default=None, help="summary folder (default <results>/<dataset>/summary)")
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    def go():
        cfg = config_from_args(args, args.dataset)
        root = dataset_results(cfg)
        runs = sorted({p.parent.relative_to(root).as_posix() for p in root.glob("sub*/*/predictions")})
        chosen = [r for r in runs if any(fnmatch.fnmatch(r, g) for g in args.runs)]
        if not chosen:
            raise UserError(f"{root}: no run matches {' '.join(args.runs)} (runs found: {', '.join(runs) or 'none'})")
        device = resolve_device(cfg.run.device)
        for run_name in chosen:
            sub, variant = run_name.split("/")
            ctx = Context(cfg, Layout(cfg, sub[len("sub"):], variant), device, force=args.force,
                          progress=not args.no_progress)
            run_step(step_spec("evaluate"), ctx)
        out = write_summary(Path(args.out) if args.out else summary_dir(cfg), collect(root, chosen),
                            tuple(args.compare) if args.compare else None)
        print(f"summary of {len(chosen)} runs: {out}")

    return guarded(go, args.debug)


if __name__ == "__main__":
    sys.exit(main())
