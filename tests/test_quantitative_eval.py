"""Step ``evaluate`` and its tables (evaluation/quantitative_eval.py): the test images' feature cache,
the long/summary tables and the paired tests, each against an independent computation."""
import numpy as np
import pytest
from scipy import stats

from evaluation import quantitative_eval as qe
from evaluation.metrics import extract_features
from models.eval_networks import load_eval_networks
from pipeline.common_format import part_path, read_split, subject_dir
from pipeline.config import load_config
from pipeline.layout import Layout
from pipeline.runner import Context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _record(subject, variant, pix, ident, decoder=0.3):
    return {"subject": subject, "variant": variant, "profile": "braindiffuser", "n_images": 4,
            "reconstruction": {"versatile": {"PixCorr": pix, "CLIP": ident, "n_images": 4}},
            "decoder": {"cliptext": {"pattern_correlation": decoder}}}


def test_long_and_summary_tables_are_mean_and_sem_across_subjects():
    records = [_record(s, v, pix, ident) for s, v, pix, ident in
               (("1", "base", 0.30, 0.90), ("2", "base", 0.20, 0.80), ("5", "base", 0.40, 0.85),
                ("1", "half", 0.10, 0.70), ("2", "half", 0.15, 0.75))]
    rows = qe.long_table(records)
    assert len(rows) == 5 * 3  # two scalar metrics + one decoder metric per record; n_images is no metric
    assert {"subject": "2", "variant": "half", "images": "decoder:cliptext", "metric": "pattern_correlation",
            "value": 0.3, "profile": "braindiffuser"} in rows
    summary = {(r["variant"], r["images"], r["metric"]): r for r in qe.summary_table(rows)}
    pix = np.array([0.30, 0.20, 0.40])
    got = summary[("base", "versatile", "PixCorr")]
    assert got["n_subjects"] == 3 and got["mean"] == pytest.approx(pix.mean())
    assert got["sem"] == pytest.approx(stats.sem(pix))
    assert summary[("half", "versatile", "CLIP")]["mean"] == pytest.approx(0.725)


def test_paired_tests_are_scipy_ttest_rel_over_shared_subjects():
    records = [_record(s, v, pix, ident) for s, v, pix, ident in
               (("1", "base", 0.30, 0.90), ("2", "base", 0.20, 0.80), ("5", "base", 0.40, 0.85),
                ("1", "half", 0.10, 0.70), ("2", "half", 0.15, 0.75), ("5", "half", 0.22, 0.81),
                ("7", "half", 0.50, 0.99))]  # subject 7 has no base run: left out of the pairs
    tests = {(t["images"], t["metric"]): t for t in qe.paired_tests(qe.long_table(records), "base", "half")}
    want = stats.ttest_rel([0.30, 0.20, 0.40], [0.10, 0.15, 0.22])
    got = tests[("versatile", "PixCorr")]
    assert got["n_subjects"] == 3 and got["t"] == pytest.approx(want.statistic) and got["p"] == pytest.approx(want.pvalue)
    assert ("versatile", "n_images") not in tests and qe.paired_tests(qe.long_table(records), "base", "none") == []


def test_collect_picks_runs_by_glob(tmp_path):
    from pipeline import io

    for run in ("sub1/base", "sub1/half", "sub2/base"):
        io.save_json(tmp_path / run / "eval" / "metrics.json", {"run": run})
    assert [r["run"] for r in qe.collect(tmp_path, ["sub*/base"])] == ["sub1/base", "sub2/base"]
    assert [r["run"] for r in qe.collect(tmp_path, ["sub1/*"])] == ["sub1/base", "sub1/half"]


@pytest.fixture()
def prepared(tmp_path):
    from prepare_data.synthetic import prepare_subject

    prepare_subject(subject_dir(tmp_path / "data", "synthetic", "1"), "1", n_train=4, n_test=3, n_voxels=10,
                    image_size=32)
    cfg = load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                           "run.dataset=synthetic", "models.mode=random-tiny"])
    return cfg


def test_ground_truth_features_are_cached_per_subject_and_follow_the_images(prepared):
    cfg = prepared
    nets = load_eval_networks(None, "cpu", names=["alexnet"], tiny=True)
    variant = Context(cfg, Layout(cfg, "1", "half"), device="cpu", progress=False)
    gts = read_split(variant.layout.base.data_dir, "test", "1", parts=("stim",)).stim
    first = qe._gt_features(variant, np.asarray(gts), nets)
    want = extract_features(np.asarray(gts), nets, profile="braindiffuser", batch_size=cfg.evaluate.batch_size,
                            progress=False)
    assert set(first) == set(want) and all(np.array_equal(first[k], want[k]) for k in want)
    cached = sorted(variant.layout.base.eval_dir().glob("gt_features_braindiffuser_*.npz"))
    assert len(cached) == 1  # in the base run: every variant of the subject shares it

    # a second call reads the cache (a marked copy proves it), --force recomputes
    np.savez(cached[0], **{k: np.zeros_like(v) for k, v in want.items()})
    assert all(not v.any() for v in qe._gt_features(variant, np.asarray(gts), nets).values())
    variant.force = True
    assert all(np.array_equal(v, want[k]) for k, v in qe._gt_features(variant, np.asarray(gts), nets).items())
    variant.force = False

    # other test images (same count): the content digest changes the key, so the stale file is not read
    stim_path = part_path(variant.layout.base.data_dir, "test", "stim", "1")
    from pipeline import io

    io.save_npy(stim_path, 255 - np.load(stim_path))
    new_gts = read_split(variant.layout.base.data_dir, "test", "1", parts=("stim",)).stim
    third = qe._gt_features(variant, np.asarray(new_gts), nets)
    assert len(sorted(variant.layout.base.eval_dir().glob("gt_features_braindiffuser_*.npz"))) == 2
    assert any(third[k].any() and not np.array_equal(third[k], want[k]) for k in want)
