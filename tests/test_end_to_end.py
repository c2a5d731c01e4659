"""The whole chain on the synthetic dataset with tiny models: outputs, skip, resume, failure."""
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import dataset_main

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TEST = 4


def _args(tmp, *extra):
    return ["--config", os.path.join(ROOT, "configs", "demo.toml"), "--subject", "1", "--no-progress",
            "--data-dir", str(tmp / "data"), "--results-dir", str(tmp / "res"),
            "--set", "synthetic.n_train=40", "--set", f"synthetic.n_test={N_TEST}",
            "--set", "synthetic.image_size=64", "--set", "versatile.num_inference_steps=4",
            "--set", "versatile.batch_size=2", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert dataset_main("synthetic", _args(tmp)) == 0
    return tmp, tmp / "res" / "synthetic" / "sub1" / "base"


def test_every_step_writes_its_outputs(run):
    _, d = run
    assert np.load(d / "features" / "vdvae_train.npy").shape[0] == 40
    assert np.load(d / "features" / "cliptext_test.npy").shape == (N_TEST, 77, 32)
    assert np.load(d / "features" / "clipvision_train.npy").shape == (40, 257, 32)
    pred = np.load(d / "predictions" / "clipvision_test.npy")
    assert pred.shape == (N_TEST, 257, 32) and pred.dtype == np.float32 and np.isfinite(pred).all()
    for kind in ("vdvae", "versatile"):
        images = sorted((d / "images" / kind).glob("*.png"))
        assert [p.name for p in images] == [f"{i:04d}.png" for i in range(N_TEST)]
        assert Image.open(images[0]).size == (64, 64)
    import json

    metrics = json.loads((d / "eval" / "metrics.json").read_text())
    rec = metrics["reconstruction"]["versatile"]
    assert metrics["profile"] == "braindiffuser" and 0.0 <= rec["AlexNet(2)"] <= 1.0
    assert set(metrics["decoder"]) == {"vdvae", "cliptext", "clipvision"}
    assert (d / "eval" / "metrics.csv").is_file() and (d / "eval" / "grid.png").is_file()
    assert "[versatile]" in (d / "config.toml").read_text()
    assert json.loads((d / "ridge.done.json").read_text())["config"]["ridge"]["alpha_vdvae"] == 1e3


def test_rerun_skips_everything(run, caplog):
    tmp, _ = run
    caplog.set_level("INFO", logger="recon")
    assert dataset_main("synthetic", _args(tmp)) == 0
    assert caplog.text.count("complete, skipping") == 6


def test_results_copied_elsewhere_stay_complete(run, tmp_path, caplog):
    import shutil

    tmp, _ = run
    for part in ("data", "res"):
        shutil.copytree(tmp / part, tmp_path / part)
    caplog.set_level("INFO", logger="recon")
    assert dataset_main("synthetic", _args(tmp_path)) == 0
    assert caplog.text.count("complete, skipping") == 6


def test_resume_regenerates_only_the_missing_image(run):
    tmp, d = run
    images = [d / "images" / "versatile" / f"{i:04d}.png" for i in range(N_TEST)]
    before = [np.asarray(Image.open(p), dtype=int) for p in images]
    stamps = [p.stat().st_mtime_ns for p in images]
    images[2].unlink()
    assert dataset_main("synthetic", _args(tmp, "--only", "versatile")) == 0
    # per-image seeds: the same image again (batched convolutions may round the last bit differently)
    again = np.asarray(Image.open(images[2]), dtype=int)
    assert np.abs(again - before[2]).max() <= 1 and (again != before[2]).mean() < 0.01
    assert [p.stat().st_mtime_ns for i, p in enumerate(images) if i != 2] == [s for i, s in enumerate(stamps) if i != 2]


def test_failure_half_way_keeps_finished_images_and_next_run_continues(run, capsys):
    tmp, d = run
    init3 = d / "images" / "vdvae" / "0003.png"
    good = init3.read_bytes()
    out = [d / "images" / "versatile" / f"{i:04d}.png" for i in range(N_TEST)]
    # a changed input (the broken init image) regenerates every image, in batches of 2:
    # [0, 1] succeeds and is kept, [2, 3] fails on the unreadable init (the old 2 and 3, made from
    # other inputs, were deleted when the run started: no resume can mistake them for this run's)
    stamps = [p.stat().st_mtime_ns for p in out]
    init3.write_bytes(b"not a png")
    assert dataset_main("synthetic", _args(tmp, "--only", "versatile")) == 2
    assert "0003.png: not a readable image" in capsys.readouterr().err
    assert not (d / "versatile.done.json").exists()
    assert all(p.is_file() and p.stat().st_mtime_ns != s for p, s in zip(out[:2], stamps[:2]))
    assert not out[2].exists() and not out[3].exists()
    init3.write_bytes(good)
    assert dataset_main("synthetic", _args(tmp, "--only", "versatile")) == 0
    assert all(p.is_file() for p in out) and (d / "versatile.done.json").is_file()
    # a run killed after its first batch, inputs unchanged: the next run makes only what is missing
    (d / "versatile.done.json").rename(d / "versatile.started.json")
    out[2].unlink()
    out[3].unlink()
    stamps = [p.stat().st_mtime_ns for p in out[:2]]
    assert dataset_main("synthetic", _args(tmp, "--only", "versatile")) == 0
    assert [p.stat().st_mtime_ns for p in out[:2]] == stamps and out[2].is_file() and out[3].is_file()


def test_interrupted_features_step_resumes_with_the_files_it_finished(run):
    tmp, d = run
    feats = d / "features"
    # the state a kill leaves behind: a start record, five of the six target files
    (d / "features.done.json").rename(d / "features.started.json")
    (feats / "clipvision_train.npy").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in feats.glob("*.npy")}
    assert dataset_main("synthetic", _args(tmp, "--only", "features")) == 0
    assert (feats / "clipvision_train.npy").is_file() and (d / "features.done.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in feats.glob("*.npy") if p.name in stamps} == stamps
    assert not (d / "features.started.json").exists()


def test_config_change_regenerates_every_image(run):
    tmp, d = run
    images = [d / "images" / "versatile" / f"{i:04d}.png" for i in range(N_TEST)]
    stamps = [p.stat().st_mtime_ns for p in images]
    assert dataset_main("synthetic", _args(tmp, "--only", "versatile", "--set", "versatile.mix_text=0.9")) == 0
    assert all(p.stat().st_mtime_ns != s for p, s in zip(images, stamps))


def test_qualitative_grid_and_multi_run_summary(run, capsys):
    from evaluation import qualitative_eval, quantitative_eval

    tmp, _ = run
    common = ["--config", os.path.join(ROOT, "configs", "demo.toml"), "--dataset", "synthetic",
              "--data-dir", str(tmp / "data"), "--results-dir", str(tmp / "res"), "--no-progress"]
    out = tmp / "grid.png"
    assert qualitative_eval.main(common + ["--runs", "sub1/base", "--images", "0", "3", "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.height == 3 * qualitative_eval.CELL  # ground truth, vdvae, versatile
    assert qualitative_eval.main(common + ["--runs", "sub9/*"]) == 2
    assert "no run with images matches" in capsys.readouterr().err
    assert quantitative_eval.main(common + ["--runs", "sub1/*"]) == 0
    summary = tmp / "res" / "synthetic" / "summary"
    assert (summary / "metrics_summary.csv").is_file() and (summary / "metrics_versatile.png").is_file()
