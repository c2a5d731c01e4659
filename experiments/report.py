"""Tables and plots of one experiment grid (re_recon_main.py --report).

Under ``<results_dir>/experiments/<experiment>/``: ``metrics_long.csv`` (subject × variant × metric),
``metrics_summary.{csv,json}`` (mean ± s.e.m. across subjects), bar plots per image set, for
dropout-style grids a plot of every metric against the training fraction per selection method
with the full-data baseline, and per subject a grid of example reconstructions across variants.
NSD experiments also get the paper's Table 1 / Table 2 beside the measured rows
(``paper_tables.{md,csv}``, :mod:`evaluation.paper_tables`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.tasks import task_config
from pipeline import io
from pipeline.config import BASE_VARIANT
from pipeline.layout import Layout, experiment_dir


def _label(spec) -> str:
    params = dict(spec.params)
    extra = [str(params[k]) for k in ("space", "subset") if k in params]
    return "-".join([spec.method, *extra])


def fraction_plot(path: Path, rows: list[dict], kinds: tuple[str, ...]) -> Path | None:
    """Metric vs training fraction, one line per (image set, selection method), mean ± s.e.m. across
    subjects; with several image sets (versatile, icnn) the reconstruction methods share the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.metrics import HIGHER_IS_BETTER

    rows = [dict(r, line=f"{r['images']}: {r['method_label']}" if len(kinds) > 1 else r["method_label"])
            for r in rows if r["images"] in kinds and r["metric"] in HIGHER_IS_BETTER]
    if not any(r["fraction"] is not None for r in rows):
        return None
    metrics = [m for m in HIGHER_IS_BETTER if any(r["metric"] == m for r in rows)]
    lines = sorted({(r["images"], r["line"]) for r in rows if r["fraction"] is not None})
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for k, (kind, line) in enumerate(lines):
            base = [r["value"] for r in rows if r["metric"] == m and r["variant"] == BASE_VARIANT and r["images"] == kind]
            pts: dict[float, list[float]] = {}
            for r in rows:
                if r["metric"] == m and r["line"] == line and r["fraction"] is not None:
                    pts.setdefault(float(r["fraction"]), []).append(r["value"])
            if base:
                pts.setdefault(1.0, []).extend(base)
            xs = sorted(pts)
            mean = [np.mean(pts[x]) for x in xs]
            sem = [np.std(pts[x], ddof=1) / np.sqrt(len(pts[x])) if len(pts[x]) > 1 else 0 for x in xs]
            ax.errorbar(xs, mean, yerr=sem, marker="o", ms=3, capsize=2, label=line, color=f"C{k}",
                        ls="-" if kind == kinds[0] else ":")
        ax.set_title(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", fontsize=9)
        ax.set_xlabel("training fraction", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{' vs '.join(kinds)}: metric vs training fraction (fraction 1 = full data)", fontsize=10)
    fig.tight_layout()
    io.save_figure(path, fig)
    return path


def write_report(exp, tasks, extra_configs=(), extra_overrides=()) -> Path:
    from evaluation.qualitative_eval import variant_grid
    from evaluation.quantitative_eval import long_table, write_summary
    from pipeline.common_format import read_split

    cfg0 = exp.config(list(extra_overrides), list(extra_configs))
    out = experiment_dir(cfg0, exp.name)
    records, specs, layouts = [], {}, {}
    for task in tasks:
        cfg = task_config(exp, task, extra_configs, extra_overrides)
        layout = Layout(cfg, task.subject, task.variant.name)
        path = layout.metrics("json")
        if path.is_file():
            records.append(io.load_json(path))
            specs[task.variant.name] = task.variant
            layouts.setdefault(task.subject, {})[task.variant.name] = layout
    if not records:
        io.save_json(out / "metrics_summary.json", {"runs": [], "summary": []})
        return out
    rows = long_table(records)
    for r in rows:
        spec = specs[r["variant"]]
        r["method"] = spec.method
        r["method_label"] = _label(spec)
        r["fraction"] = dict(spec.params).get("fraction")
    write_summary(out, records, rows=rows)
    if exp.dataset == "nsd":  # the paper's Table 1 / Table 2 beside the measured rows
        from evaluation.paper_tables import write_paper_tables

        n_images = sorted({res.get("n_images") for r in records for res in r["reconstruction"].values()} - {None})
        write_paper_tables(out, rows, specs, n_images=n_images[0] if len(n_images) == 1 else None)
    kinds = sorted({r["images"] for r in rows if not r["images"].startswith("decoder:")})
    for kind in kinds:
        fraction_plot(out / f"fraction_{kind}.png", rows, (kind,))
    methods = tuple(k for k in ("versatile", "icnn") if k in kinds)
    if len(methods) > 1:
        fraction_plot(out / "fraction_comparison.png", rows, methods)
    for subject, by_variant in layouts.items():
        any_layout = next(iter(by_variant.values()))
        gts = read_split(any_layout.base.data_dir, "test", subject, parts=("stim",)).stim
        variant_grid(out / f"grid_sub{subject}.png", np.asarray(gts), by_variant)
    return out
