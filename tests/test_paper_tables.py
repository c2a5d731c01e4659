"""The paper's Table 1 / Table 2 beside measured rows (evaluation/paper_tables.py, paper_nsd experiment)."""
import csv

import numpy as np
import pytest

from evaluation.metrics import METRICS
from evaluation.paper_tables import load_reference, render, write_paper_tables
from experiments.grid import load_experiment

IDENT = ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP")


def _rows(values: dict, profile="braindiffuser"):
    """long_table rows from {(subject, variant, images): {metric: value}}."""
    return [{"subject": s, "variant": v, "images": k, "metric": m, "value": x, "profile": profile}
            for (s, v, k), ms in values.items() for m, x in ms.items()]


def _metrics(pix, alex2, eff):
    base = {m: 0.5 for m in METRICS}
    base.update({"PixCorr": pix, "AlexNet(2)": alex2, "EffNet-B": eff})
    return base


@pytest.fixture(scope="module")
def specs():
    exp = load_experiment("paper_nsd")
    assert exp.dataset == "nsd" and exp.subjects == ["1", "2", "5", "7"]
    return {v.name: v for v in exp.variants}


def test_paper_nsd_experiment_defines_base_and_the_three_ablations(specs):
    assert set(specs) == {"base", "wo_vdvae_use_vdvae_init-False", "wo_cliptext_use_clip_text-False",
                          "wo_clipvision_use_clip_vision-False"}
    exp = load_experiment("paper_nsd")
    assert "vdvae" in exp.config().evaluate.images  # Only-VDVAE = the base run's VDVAE images


def test_reference_file_holds_the_issue_numbers():
    ref = load_reference()
    t1 = ref["brain_diffuser"]["table1"]["rows"][0]
    assert [t1[m] for m in METRICS] == [0.254, 0.356, 94.2, 96.2, 87.2, 91.5, 0.775, 0.423]
    t2 = {r["label"]: [r[m] for m in METRICS] for r in ref["brain_diffuser"]["table2"]["rows"]}
    assert t2["Only-VDVAE"] == [0.358, 0.437, 97.7, 97.6, 77.0, 71.1, 0.906, 0.581]
    assert t2["w/o CLIP-Vision"] == [0.327, 0.433, 93.9, 94.1, 84.7, 84.5, 0.821, 0.509]
    assert [ref["mindeye2"]["row"][m] for m in METRICS] == [0.322, 0.431, 96.1, 98.6, 95.4, 93.0, 0.619, 0.344]
    assert "doi:10.1038/s41598-023-42891-8" in ref["brain_diffuser"]["source"]


def test_tables_put_measured_rows_beside_the_paper_with_differences(specs, tmp_path):
    vals = {(s, "base", "versatile"): _metrics(p, a, 0.70) for s, p, a in
            (("1", 0.30, 0.95), ("2", 0.25, 0.93), ("5", 0.20, 0.94), ("7", 0.25, 0.96))}
    vals[("1", "base", "vdvae")] = _metrics(0.40, 0.97, 0.90)
    vals[("1", "wo_vdvae_use_vdvae_init-False", "versatile")] = _metrics(0.10, 0.80, 0.80)
    vals[("2", "wo_vdvae_use_vdvae_init-False", "versatile")] = _metrics(0.50, 0.50, 0.50)  # not subject 1
    text, rows = render(_rows(vals), specs, n_images=982)
    assert "Evaluation profile of the measured rows: **braindiffuser**" in text
    assert "982 test images" in text and "MindEye2" not in text
    got = {(r["table"], r["row"], r["metric"]): r for r in rows}
    # Table 1: mean over subjects 1, 2, 5, 7 = 0.25 vs .254; AlexNet(2) 94.5 % vs 94.2 %
    t1 = got[("table1", "Brain-Diffuser", "PixCorr")]
    assert t1["measured"] == pytest.approx(0.25) and t1["difference"] == pytest.approx(0.25 - 0.254)
    assert t1["subjects"] == "1,2,5,7"
    a2 = got[("table1", "Brain-Diffuser", "AlexNet(2)")]
    assert a2["measured"] == pytest.approx(94.5) and a2["difference"] == pytest.approx(0.3) and a2["unit"] == "percent"
    # Table 2: subject 1 only
    assert got[("table2", "Brain-Diffuser (full)", "PixCorr")]["measured"] == pytest.approx(0.30)
    assert got[("table2", "Only-VDVAE", "EffNet-B")]["difference"] == pytest.approx(0.90 - 0.906)
    wo = got[("table2", "w/o VDVAE", "PixCorr")]
    assert wo["measured"] == pytest.approx(0.10) and wo["difference"] == pytest.approx(0.10 - 0.143)
    assert ("table2", "w/o CLIP-Text", "PixCorr") not in got  # not run: shown as such
    assert "| w/o CLIP-Text (measured) | not run" in text
    assert "| -0.004 |" in text or "| -0.004" in text  # PixCorr difference printed with its sign
    path = write_paper_tables(tmp_path, _rows(vals), specs, n_images=982, echo=False)
    assert path.read_text().startswith("Evaluation profile")
    with open(tmp_path / "paper_tables.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_mindeye_profile_is_stated_and_adds_the_mindeye2_context_row(specs, capsys, tmp_path):
    vals = {("1", "base", "versatile"): _metrics(0.3, 0.9, 0.7)}
    text, _ = render(_rows(vals, profile="mindeye"), specs)
    assert "**mindeye**" in text and "NOT the profile of the paper's numbers" in text
    assert "MindEye2 (40 sessions; context)" in text and "96.1%" in text and "1000 test images" in text
    write_paper_tables(tmp_path, _rows(vals, profile="mindeye"), specs)
    assert "MindEye2" in capsys.readouterr().out
