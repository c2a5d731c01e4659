"""The paper's Table 1 and Table 2 beside the measured rows of an NSD experiment, with differences.

Reference numbers live in one data file with their sources (``evaluation/reference/paper_numbers.toml``).
Measured rows come from the experiment's ``metrics.json`` records: Table 1 is the mean of the base
run's reconstructions over the subjects the paper averages (1, 2, 5, 7), Table 2 is subject 1's base
run (its ``versatile`` and ``vdvae`` = Only-VDVAE images) and the ablation variants, recognised by
their config overrides (``versatile.use_vdvae_init=false`` = w/o VDVAE, …). The evaluation profile
of the measured rows is stated; the paper's numbers are from the ``braindiffuser`` profile on 982
images, and MindEye2's 40-session row is shown as context under the ``mindeye`` profile.

``re_recon_main.py paper_nsd --report`` writes ``paper_tables.md`` and ``paper_tables.csv`` beside
the experiment summary and prints the tables.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from evaluation.metrics import HIGHER_IS_BETTER, METRICS
from pipeline import io
from pipeline.errors import UserError

REFERENCE_FILE = Path(__file__).resolve().parent / "reference" / "paper_numbers.toml"
PROFILE_NOTES = {
    "braindiffuser": "Brain-Diffuser's own evaluation code (224 px network inputs, no crop; recon resized to "
                     "the GT's 425 px for PixCorr/SSIM; column-wise SSIM of scikit-image 0.17; EfficientNet-B1 V1; "
                     "CLIP fp32) — the profile the paper's numbers come from",
    "mindeye": "MindEye2's evaluation notebook (everything first to 256 px; PixCorr/SSIM at 425 px with 2-D SSIM; "
               "network inputs 256/342/224/255/224 px; EfficientNet-B1 V2; CLIP fp16 on CUDA) — NOT the profile "
               "of the paper's numbers, so differences mix method and metric convention",
}


def load_reference(path: str | Path = REFERENCE_FILE) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: reference numbers not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None


def _scale(metric: str, value: float, percent: list[str]) -> float:
    """Measured values are fractions; the paper prints identification in percent."""
    return value * 100.0 if metric in percent else value


def _fmt(metric: str, value: float | None, percent: list[str], signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    if metric in percent:
        return f"{value:+.1f}" if signed else f"{value:.1f}%"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _ablation_of(spec) -> str | None:
    """The ``section.key=value`` ablation override of a variant (lower-case value), if it has exactly one."""
    overrides = [o.replace(" ", "") for o in getattr(spec, "overrides", ())]
    keys = ("versatile.use_vdvae_init=", "versatile.use_clip_text=", "versatile.use_clip_vision=")
    hits = [o.lower() for o in overrides if o.startswith(keys)]
    return hits[0] if len(hits) == 1 else None


def measured_rows(rows: list[dict], specs: dict, reference_rows: list[dict], subjects: list[str]) -> list[dict]:
    """For each reference row, the matching measured rows (one per matching variant) with per-metric
    means over ``subjects`` (those present), the subjects used and the profile."""
    by = {}
    profiles = set()
    for r in rows:
        if r["images"].startswith("decoder:") or r["metric"] not in METRICS:
            continue
        by.setdefault((r["variant"], r["images"]), {}).setdefault(r["metric"], {})[str(r["subject"])] = r["value"]
        profiles.add(r["profile"])
    out = []
    for ref in reference_rows:
        if "variant" in ref:
            variants = [ref["variant"]] if ref["variant"] in specs or (ref["variant"], ref["images"]) in by else []
        else:
            variants = sorted(name for name, spec in specs.items() if _ablation_of(spec) == ref["ablation"].lower())
        for variant in variants:
            values = by.get((variant, ref["images"]), {})
            used = sorted({s for m in values.values() for s in m if s in subjects}, key=lambda s: subjects.index(s))
            if not used:  # defined but not measured (yet) for these subjects: reported as "not run"
                continue
            means = {m: float(np.mean([values[m][s] for s in used if s in values[m]])) if m in values and used else None
                     for m in METRICS}
            out.append({"reference": ref, "variant": variant, "subjects": used, "means": means})
    return out


def render(rows: list[dict], specs: dict, n_images: int | None = None, reference: dict | None = None) -> tuple[str, list[dict]]:
    """(markdown text, long CSV rows) of both tables for the measured ``rows`` (``long_table`` format)."""
    ref = reference or load_reference()
    bd = ref["brain_diffuser"]
    percent = list(bd.get("percent", []))
    profiles = sorted({r["profile"] for r in rows if not r["images"].startswith("decoder:")})
    profile = profiles[0] if len(profiles) == 1 else ", ".join(profiles) or "unknown"
    lines = [f"Evaluation profile of the measured rows: **{profile}** — {PROFILE_NOTES.get(profile, '')}",
             f"Paper: {bd['source']}; profile {bd['profile']}, {bd['n_test']} test images"
             + (f"; measured on {n_images} test images." if n_images else "."),
             "Identification differences are in percentage points; lower is better for EffNet-B and SwAV.", ""]
    csv = []
    head = "| row | " + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 1) + "|"
    for key in ("table1", "table2"):
        table = bd[key]
        subjects = [str(s) for s in table["subjects"]]
        lines += [f"### {table['caption']}", "", head, rule]
        matched = measured_rows(rows, specs, table["rows"], subjects)
        for ref_row in table["rows"]:
            paper = {m: float(ref_row[m]) for m in METRICS}
            lines.append(f"| {ref_row['label']} (paper) | " + " | ".join(_fmt(m, paper[m], percent) for m in METRICS) + " |")
            mine = [x for x in matched if x["reference"] is ref_row]
            if not mine:
                lines.append(f"| {ref_row['label']} (measured) | " + " | ".join("not run" for _ in METRICS) + " |")
            for x in mine:
                got = {m: (_scale(m, v, percent) if v is not None else None) for m, v in x["means"].items()}
                subs = ",".join(x["subjects"]) or "none"
                tag = f"measured, {x['variant']}, sub {subs}"
                lines.append(f"| {ref_row['label']} ({tag}) | " + " | ".join(_fmt(m, got[m], percent) for m in METRICS) + " |")
                diff = {m: (got[m] - paper[m]) if got[m] is not None else None for m in METRICS}
                lines.append(f"| difference (measured − paper) | "
                             + " | ".join(_fmt(m, diff[m], percent, signed=True) for m in METRICS) + " |")
                for m in METRICS:
                    csv.append({"table": key, "row": ref_row["label"], "variant": x["variant"], "subjects": subs,
                                "metric": m, "paper": paper[m], "measured": got[m], "difference": diff[m],
                                "unit": "percent" if m in percent else "value", "profile": profile})
        lines.append("")
    if profile == "mindeye" and "mindeye2" in ref:
        me = ref["mindeye2"]
        row = me["row"]
        lines += ["### Context: MindEye2 under its own evaluation (mindeye profile)", "",
                  f"{me['source']}; {me['n_test']} test images.", "", head, rule,
                  f"| {row['label']} | " + " | ".join(_fmt(m, float(row[m]), percent) for m in METRICS) + " |", ""]
    return "\n".join(lines), csv


def write_paper_tables(out_dir: str | Path, rows: list[dict], specs: dict, n_images: int | None = None,
                       echo: bool = True) -> Path:
    """``paper_tables.md`` and ``paper_tables.csv`` in ``out_dir``; prints the markdown when ``echo``."""
    out_dir = Path(out_dir)
    text, csv = render(rows, specs, n_images)
    io.save_text(out_dir / "paper_tables.md", text + "\n")
    import csv as csvmod
    import io as pyio

    buf = pyio.StringIO()
    if csv:
        w = csvmod.DictWriter(buf, fieldnames=list(csv[0]))
        w.writeheader()
        w.writerows(csv)
    io.save_text(out_dir / "paper_tables.csv", buf.getvalue())
    if echo:
        print(text)
    return out_dir / "paper_tables.md"
