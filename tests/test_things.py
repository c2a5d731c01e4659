"""THINGS-fMRI1 prepare on tiny table-format (pandas/PyTables) and BData (bdpy) fixtures."""
import logging
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures_things import expected_split, make_things_fixture
from pipeline import common_format as cf
from pipeline import io
from pipeline.errors import UserError
from prepare_data import things

SIZE = 40  # min side of the fixture's non-square images, so those are only centre-cropped


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("things") / "raw"
    return make_things_fixture(root, subjects=("01", "02"), bdata="split")


@pytest.fixture(scope="module")
def prepared(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "sub01"
    summary = things.prepare_subject(fx["raw_dir"], out, "01", captions=fx["captions"], image_size=SIZE,
                                     progress=False)
    return out, summary


def _read(out, split, subject="01", parts=cf.PARTS):
    return cf.read_split(out, split, subject, parts=parts)


def test_table_format_matches_naive_average(fx, prepared):
    out, summary = prepared
    assert summary["source"] == "tsv"
    assert (summary["n_train"], summary["n_test"]) == (12, 4)
    for split, nrep in (("train", 1), ("test", 3)):
        data = _read(out, split)
        ref = expected_split(fx, "01", split, things.DEFAULT_ROIS)
        assert data.ids.tolist() == ref["ids"]  # first appearance in trial order, no extension
        assert (data.nrep == nrep).all() and data.nrep.dtype == np.int16
        assert data.fmri.dtype == np.float32 and data.fmri.shape == (len(ref["ids"]), len(ref["rows"]))
        np.testing.assert_allclose(data.fmri, ref["fmri"], rtol=1e-6, atol=1e-7)
    # the voxels outside every ROI (the first rows) are not used; IT is not in the default set
    assert summary["n_voxel"] < 40
    assert "IT" not in summary["roi"].split(" + ") and "LO1 (prf)" in summary["roi"]


def test_test_images_are_shown_once_per_session(fx):
    info = fx["subjects"]["01"]
    for name in fx["test_names"]:
        sessions = [s for s, n in zip(info["session"], info["stimulus"]) if n == name]
        assert sorted(sessions) == [1, 2, 3]


@pytest.mark.parametrize("layout", ["split", "single"])
def test_bdata_conversion_gives_identical_output(fx, prepared, tmp_path, layout):
    out_tsv, _ = prepared
    if layout == "split":
        raw = fx["raw_dir"]
    else:
        raw = tmp_path / "raw"
        make_things_fixture(raw, subjects=("01",), bdata="single", table=False, captions=False)
    out = tmp_path / "o"
    summary = things.prepare_subject(raw, out, "01", source="auto" if layout == "single" else "bdata",
                                     captions=fx["captions"], image_size=SIZE, progress=False)
    assert summary["source"] == "bdata"
    for split in ("train", "test"):
        a, b = _read(out_tsv, split), _read(out, split)
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.fmri, b.fmri)
        np.testing.assert_array_equal(a.nrep, b.nrep)
        np.testing.assert_array_equal(a.stim, b.stim)
        np.testing.assert_array_equal(a.cap, b.cap)


@pytest.mark.parametrize("source", ["tsv", "bdata"])
@pytest.mark.parametrize("rois", [["V1"], ["V1", "LO1 (prf)", "rLOC"], ["glasser-p9-\n46v"], "IT + hV4"])
def test_explicit_roi_union(fx, tmp_path, source, rois):
    out = tmp_path / "o"
    summary = things.prepare_subject(fx["raw_dir"], out, "02", rois=rois, source=source, image_size=16,
                                     progress=False)
    ref = expected_split(fx, "02", "test", ["IT", "hV4"] if rois == "IT + hV4" else rois)
    data = _read(out, "test", "02", parts=("fmri",))
    assert summary["n_voxel"] == len(ref["rows"])
    np.testing.assert_allclose(data.fmri, ref["fmri"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("source", ["tsv", "bdata"])
def test_absent_roi_column_lists_columns_present(fx, tmp_path, source):
    with pytest.raises(UserError) as err:
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", "01", rois=["V1", "V4"], source=source,
                               progress=False)
    msg = str(err.value)
    assert "'V4'" in msg and "'hV4'" in msg and "sub-01" in msg
    assert not (tmp_path / "o").exists()


def test_default_rois_skip_those_a_subject_lacks(tmp_path, caplog):
    fx = make_things_fixture(tmp_path / "raw", subjects=("03",), drop_rois=("lSTS", "rSTS"), captions=False)
    with caplog.at_level(logging.WARNING):
        summary = things.prepare_subject(fx["raw_dir"], tmp_path / "o", "03", image_size=16, progress=False)
    assert "lSTS" in caplog.text and "lSTS" not in summary["roi"]
    rois = [r for r in things.DEFAULT_ROIS if r not in ("lSTS", "rSTS")]
    ref = expected_split(fx, "03", "train", rois)
    np.testing.assert_allclose(_read(tmp_path / "o", "train", "03", ("fmri",)).fmri, ref["fmri"], rtol=1e-6, atol=1e-7)


def test_images_are_centre_cropped_and_resized(fx, prepared):
    out, _ = prepared
    data = _read(out, "train", parts=("stim", "ids"))
    assert data.stim.shape[1:] == (SIZE, SIZE, 3)
    checked = 0
    for row, stem in enumerate(data.ids):
        src = np.asarray(Image.open(fx["images"][stem + ".jpg"]).convert("RGB"))
        h, w = src.shape[:2]
        if min(h, w) == SIZE:  # only a crop: exact
            top, left = (h - SIZE) // 2, (w - SIZE) // 2
            np.testing.assert_array_equal(data.stim[row], src[top:top + SIZE, left:left + SIZE])
            checked += 1
        else:  # resized: same mean colour
            np.testing.assert_allclose(data.stim[row].reshape(-1, 3).mean(0), src.reshape(-1, 3).mean(0), atol=3)
    assert checked >= 4


def test_native_size_requires_uniform_images(fx, tmp_path):
    with pytest.raises(UserError, match="differ in size.*image_size"):
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", "01", image_size=None, progress=False)


def test_captions_wide_table(fx, prepared, caplog):
    out, summary = prepared
    for split in ("train", "test"):
        data = _read(out, split, parts=("cap", "ids"))
        for row, stem in enumerate(data.ids):
            assert [c for c in data.cap[row] if c] == fx["caption_table"].get(stem, [])
    assert summary["splits"]["train"]["captions_missing"] == 1


def test_manifest(prepared):
    out, summary = prepared
    manifest = io.load_json(cf.manifest_path(out))
    assert manifest["source"] == "tsv" and manifest["n_voxel"] == summary["n_voxel"]
    assert manifest["n_voxel_total"] == 40 and len(manifest["sources"]) == 3


def test_table_reading_never_unpickles(fx, tmp_path, monkeypatch):
    """pandas pickles this file's column labels; the reader must get by without them."""
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pd, "read_hdf", refuse)
    things.prepare_subject(fx["raw_dir"], tmp_path / "o", "02", source="tsv", image_size=16, progress=False)
    assert _read(tmp_path / "o", "test", "02", ("fmri",)).fmri.shape[0] == 4


def test_list_subjects(fx, tmp_path):
    assert things.list_subjects(fx["raw_dir"]) == {"01": ["tsv", "bdata"], "02": ["tsv", "bdata"]}
    (fx["raw_dir"] / "betas_csv" / "sub-02_VoxelMetadata.csv").rename(tmp_path / "moved.csv")
    try:
        assert things.list_subjects(fx["raw_dir"])["02"] == ["bdata"]
        assert "02       -    yes" in things.format_subject_table(things.list_subjects(fx["raw_dir"]))
    finally:
        (tmp_path / "moved.csv").rename(fx["raw_dir"] / "betas_csv" / "sub-02_VoxelMetadata.csv")


@pytest.mark.parametrize("subject, name", [(1, "sub-01"), ("01", "sub-01"), ("sub-03", "sub-03"), ("sub02", "sub-02")])
def test_subject_names(subject, name):
    assert things.subject_name(subject) == name


# ---- bad input ----------------------------------------------------------------------------------

def _copy_table(fx, tmp_path, subject="01"):
    import shutil

    raw = tmp_path / "raw"
    (raw / "betas_csv").mkdir(parents=True)
    for key in ("responses", "stimuli", "voxels"):
        shutil.copy(fx["subjects"][subject]["files"][key], raw / "betas_csv")
    return raw


def test_missing_files_are_named(fx, tmp_path):
    raw = _copy_table(fx, tmp_path)
    (raw / "betas_csv" / "sub-01_StimulusMetadata.csv").unlink()
    with pytest.raises(UserError, match="sub-01_StimulusMetadata.csv"):
        things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], progress=False)
    with pytest.raises(UserError, match="sub-01_training.h5"):
        things.prepare_subject(raw, tmp_path / "o", "01", source="bdata", progress=False)
    with pytest.raises(UserError, match="sub-07"):
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", 7, progress=False)
    with pytest.raises(UserError, match="source"):
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", 1, source="csv")
    with pytest.raises(UserError, match="subject"):
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", "abc")


def test_voxel_table_from_another_subject_is_refused(fx, tmp_path):
    raw = _copy_table(fx, tmp_path)
    meta = pd.read_csv(raw / "betas_csv" / "sub-01_VoxelMetadata.csv")
    meta.iloc[:-3].to_csv(raw / "betas_csv" / "sub-01_VoxelMetadata.csv", index=False)
    with pytest.raises(UserError, match="37 voxel rows.*40"):
        things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], progress=False)


def test_stimulus_table_problems(fx, tmp_path):
    raw = _copy_table(fx, tmp_path)
    path = raw / "betas_csv" / "sub-01_StimulusMetadata.csv"
    stim = pd.read_csv(path)
    stim.drop(columns=["stimulus"]).to_csv(path, index=False)
    with pytest.raises(UserError, match="'stimulus'"):
        things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], progress=False)
    stim.iloc[:-2].to_csv(path, index=False)
    with pytest.raises(UserError, match="24 trial columns.*22 trials"):
        things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], progress=False)
    stim.assign(trial_type="train").to_csv(path, index=False)
    with pytest.raises(UserError, match="no 'test' trials"):
        things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], progress=False)
    assert not (tmp_path / "o").exists()


def test_catch_trials_are_dropped(fx, tmp_path, caplog):
    raw = _copy_table(fx, tmp_path)
    path = raw / "betas_csv" / "sub-01_StimulusMetadata.csv"
    stim = pd.read_csv(path)
    first_train = stim.index[stim.trial_type == "train"][0]
    stim.loc[first_train, "trial_type"] = "catch"
    stim.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        summary = things.prepare_subject(raw, tmp_path / "o", "01", image_dir=fx["image_dir"], image_size=16,
                                         progress=False)
    assert summary["n_train"] == 11 and "catch" in caplog.text


def test_missing_image_names_stimulus_and_folder(fx, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(fx["image_dir"], images)
    gone = next(images.rglob(fx["test_names"][1]))
    gone.unlink()
    with pytest.raises(UserError) as err:
        things.prepare_subject(fx["raw_dir"], tmp_path / "o", "01", image_dir=images, progress=False)
    assert gone.stem in str(err.value) and str(images) in str(err.value)
    assert not (tmp_path / "o").exists()


def test_main_script_lists_subjects_and_prepares(tmp_path, capsys):
    """things_main.py --list-subjects and --only prepare on the fixture."""
    from fixtures_things import make_things_fixture
    from pipeline.cli import dataset_main
    from pipeline.common_format import read_split, subject_dir

    make_things_fixture(tmp_path / "raw")
    args = ["--raw-dir", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data"), "--subject", "01",
            "--set", "things.image_size=32", "--no-progress"]
    assert dataset_main("things", args + ["--list-subjects"]) == 0
    assert "01" in capsys.readouterr().out
    assert dataset_main("things", args + ["--only", "prepare"]) == 0
    test = read_split(subject_dir(tmp_path / "data", "things", "01"), "test", "01")
    assert test.stim.shape[1:] == (32, 32, 3) and (test.nrep > 1).all()
