"""Deeprecon prepare on a tiny bdpy-written fixture: averages, ROI selection, images, captions, errors."""
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from fixtures_deeprecon import FILE_PATTERN, SESSIONS, expected_split, make_deeprecon_fixture, stimulus_id
from pipeline import common_format as cf
from pipeline import io
from pipeline.errors import UserError
from prepare_data import deeprecon


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("deeprecon")
    return make_deeprecon_fixture(root / "raw", subjects=("sub-01", "sub-02"))


@pytest.fixture(scope="module")
def prepared(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "sub01"
    summary = deeprecon.prepare_subject(fx["raw_dir"], out, "sub-01", captions=fx["captions"], progress=False)
    return out, summary


def _decoded(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_averages_ids_and_nrep_match_naive_computation(fx, prepared):
    out, summary = prepared
    assert summary["n_voxel"] == len(fx["roi_columns"]["ROI_VC"]) < fx["n_voxels"]
    assert (summary["n_train"], summary["n_test"], summary["n_art"]) == (6, 3, 2)
    for split in SESSIONS:
        data = cf.read_split(out, split, "sub-01")
        ref = expected_split(fx, "sub-01", split)
        assert data.ids.tolist() == ref["ids"]  # first-appearance order
        assert data.ids.dtype.kind == "U"
        assert data.fmri.dtype == np.float32
        np.testing.assert_allclose(data.fmri, ref["fmri"], rtol=1e-6, atol=1e-6)
        assert data.nrep.dtype == np.int16
        np.testing.assert_array_equal(data.nrep, ref["nrep"])
        assert data.stim.dtype == np.uint8 and len(data.stim) == len(ref["ids"])


def test_images_keep_native_size_per_split_and_follow_row_order(fx, prepared):
    out, _ = prepared
    for split, size in (("train", 32), ("test", 32), ("art", 40)):
        data = cf.read_split(out, split, "sub-01")
        assert data.stim.shape[1:] == (size, size, 3)
        paths = fx["subjects"]["sub-01"][split]["images"]
        for row, label in enumerate(data.ids):
            np.testing.assert_array_equal(data.stim[row], _decoded(paths[label]))


def test_test_split_reads_jpeg_jpg_and_png(fx):
    exts = {p.suffix for p in fx["subjects"]["sub-01"]["test"]["images"].values()}
    assert exts == {".JPEG", ".jpg", ".png"}


def test_captions_from_table_and_empty_for_missing(fx, prepared):
    out, summary = prepared
    for split in SESSIONS:
        data = cf.read_split(out, split, "sub-01")
        for row, label in enumerate(data.ids):
            want = fx["caption_table"].get(label, [])
            got = [c for c in data.cap[row] if c]
            assert got == want
            assert list(data.cap[row][len(want):]) == [""] * (data.cap.shape[1] - len(want))
    assert summary["splits"]["art"]["captions_missing"] == 2
    assert summary["splits"]["train"]["captions_missing"] == 1


def test_manifest_records_roi_and_sources(fx, prepared):
    out, _ = prepared
    manifest = io.load_json(cf.manifest_path(out))
    assert manifest["roi"] == "ROI_VC"
    assert manifest["n_voxel"] == len(fx["roi_columns"]["ROI_VC"])
    assert len(manifest["sources"]) == 3


@pytest.mark.parametrize("roi, keys", [
    ("ROI_V2", ["ROI_V2"]),
    (["ROI_V1", "ROI_HVC"], ["ROI_V1", "ROI_HVC"]),
    ("ROI_V3 + ROI_hV4", ["ROI_V3", "ROI_hV4"]),
    ("hcp180_V1", ["hcp180_V1"]),
])
def test_roi_selection_picks_the_flagged_voxel_columns(fx, tmp_path, roi, keys):
    out = tmp_path / "o"
    deeprecon.prepare_subject(fx["raw_dir"], out, "sub-02", roi=roi, sessions={"test": "ImageNetTest"},
                              progress=False)
    data = cf.read_split(out, "test", "sub-02", parts=("fmri", "ids"))
    ref = expected_split(fx, "sub-02", "test", roi_keys=keys)
    assert data.fmri.shape[1] == len(ref["columns"])
    np.testing.assert_allclose(data.fmri, ref["fmri"], rtol=1e-6, atol=1e-6)


def test_no_captions_gives_empty_strings_and_a_warning(fx, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-02", sessions={"art": "ArtificialShapes"},
                                  progress=False)
    cap = cf.read_split(tmp_path / "o", "art", "sub-02", parts=("cap",)).cap
    assert cap.shape == (2, 1) and (cap == "").all()
    assert "no captions table" in caplog.text


def test_resize_to_common_square_size(fx, tmp_path):
    out = tmp_path / "o"
    deeprecon.prepare_subject(fx["raw_dir"], out, "sub-01", image_size=16, progress=False)
    for split in SESSIONS:
        data = cf.read_split(out, split, "sub-01", parts=("stim", "ids"))
        assert data.stim.shape[1:] == (16, 16, 3)
        src = _decoded(fx["subjects"]["sub-01"][split]["images"][data.ids[0]])
        # a smooth image keeps its mean colour when downsampled
        np.testing.assert_allclose(data.stim[0].reshape(-1, 3).mean(0), src.reshape(-1, 3).mean(0), atol=3)


def test_rest_rows_are_dropped_with_a_warning(tmp_path, caplog):
    fx = make_deeprecon_fixture(tmp_path / "raw", rest_rows=2, captions=False, seed=3)
    with caplog.at_level(logging.WARNING):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", progress=False)
    ref = expected_split(fx, "sub-01", "train")
    data = cf.read_split(tmp_path / "o", "train", "sub-01", parts=("fmri", "nrep"))
    np.testing.assert_allclose(data.fmri, ref["fmri"], rtol=1e-6, atol=1e-6)
    assert data.nrep.sum() == 30
    assert "'n/a'" in caplog.text


def test_stimulus_id_float_codes_give_the_same_result(fx, tmp_path):
    sessions = {"train": "ImageNetTraining", "test": "ImageNetTest"}
    for key in ("stimulus_name", "stimulus_id"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / key, "sub-01", sessions=sessions, label_key=key,
                                  progress=False)
    for split in sessions:
        a = cf.read_split(tmp_path / "stimulus_name", split, "sub-01")
        b = cf.read_split(tmp_path / "stimulus_id", split, "sub-01")
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.fmri, b.fmri)
    assert deeprecon.decode_stimulus_id(1518878.005958) == "n01518878_5958"
    assert deeprecon.decode_stimulus_id(stimulus_id("n02000000_200")) == "n02000000_200"


def test_list_subjects_and_table(tmp_path):
    fx = make_deeprecon_fixture(tmp_path / "raw", subjects=("sub-01", "AM"), captions=False)
    (tmp_path / "raw" / FILE_PATTERN.format(subject="AM", session="ArtificialShapes")).unlink()
    found = deeprecon.list_subjects(fx["raw_dir"])
    assert found == {"AM": ["ImageNetTraining", "ImageNetTest"],
                     "sub-01": ["ImageNetTraining", "ImageNetTest", "ArtificialShapes"]}
    table = deeprecon.format_subject_table(found).splitlines()
    assert table[0].split()[-1] == "complete"
    assert table[1].split()[0] == "AM" and table[1].split()[-1] == "no"
    assert table[2].split()[-1] == "yes"
    # a public-style pattern finds nothing here
    assert deeprecon.list_subjects(fx["raw_dir"], "{subject}_{session}_fmriprep_volume_native.h5") == {}


# ---- bad input: a UserError naming the file/key, and nothing written ----------------------------

def _assert_nothing_written(out):
    assert not out.exists() or not any(p.suffix == ".npy" or p.name == "manifest.json" for p in out.iterdir())


def test_missing_session_file(tmp_path):
    fx = make_deeprecon_fixture(tmp_path / "raw", captions=False)
    missing = tmp_path / "raw" / FILE_PATTERN.format(subject="sub-01", session="ArtificialShapes")
    missing.unlink()
    with pytest.raises(UserError, match="session file not found") as err:
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", progress=False)
    assert str(missing) in str(err.value)
    _assert_nothing_written(tmp_path / "o")
    with pytest.raises(UserError, match="sub-09"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-09", progress=False)


def test_absent_roi_key_lists_keys_present(fx, tmp_path):
    with pytest.raises(UserError) as err:
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", roi="ROI_FFA", progress=False)
    msg = str(err.value)
    assert "'ROI_FFA'" in msg and "ROI_VC" in msg and "ROI_hV4" in msg and "ImageNetTraining" in msg
    assert "voxel_x" not in msg and "'VoxelData'" not in msg
    _assert_nothing_written(tmp_path / "o")


def test_bad_label_key(fx, tmp_path):
    with pytest.raises(UserError, match="'stim_name'.*stimulus_name"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", label_key="stim_name", progress=False)
    with pytest.raises(UserError, match="no vmap"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", label_key="Run", progress=False)


def test_label_without_image_names_label_and_folder(fx, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(fx["image_dir"], images)
    gone = sorted((images / "test").iterdir())[0]
    gone.unlink()
    with pytest.raises(UserError) as err:
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", image_dir=images, progress=False)
    assert gone.stem in str(err.value) and str(images) in str(err.value)
    _assert_nothing_written(tmp_path / "o")
    with pytest.raises(UserError, match="image folder not found"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", image_dir=tmp_path / "nope",
                                  progress=False)


def test_mixed_image_sizes_need_image_size(fx, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(fx["image_dir"], images)
    odd = sorted((images / "training").iterdir())[2]
    Image.new("RGB", (20, 24)).save(odd, format="JPEG")
    with pytest.raises(UserError, match="image_size") as err:
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", image_dir=images, progress=False)
    assert odd.name in str(err.value)
    deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", image_dir=images, image_size=24,
                              progress=False)
    assert cf.read_split(tmp_path / "o", "train", "sub-01", parts=("stim",)).stim.shape[1:] == (24, 24, 3)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_leaves_no_outputs(fx, tmp_path, damage):
    images = tmp_path / "images"
    shutil.copytree(fx["image_dir"], images)
    bad = [p for p in sorted((images / "test").iterdir()) if p.suffix == ".JPEG"][0]
    data = bad.read_bytes()
    # garbage fails when sizes are checked; a truncated JPEG only when pixels are decoded,
    # after the train images were already streamed into their temporary file
    cut = data.index(b"\xff\xda") + 20  # keep the headers, lose most of the scan
    bad.write_bytes(b"not an image" if damage == "garbage" else data[:cut])
    out = tmp_path / "o"
    with pytest.raises(UserError, match="cannot read image") as err:
        deeprecon.prepare_subject(fx["raw_dir"], out, "sub-01", image_dir=images, progress=False)
    assert str(bad) in str(err.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_sessions_with_different_voxels_are_refused(fx, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for session in ("ImageNetTraining", "ImageNetTest"):
        shutil.copy(fx["subjects"]["sub-01"]["train" if session == "ImageNetTraining" else "test"]["path"],
                    raw / FILE_PATTERN.format(subject="mix", session=session))
    # the other subject's test file has other voxel coordinates
    shutil.copy(fx["subjects"]["sub-02"]["test"]["path"], raw / FILE_PATTERN.format(subject="mix", session="ImageNetTest"))
    with pytest.raises(UserError, match="voxel"):
        deeprecon.prepare_subject(raw, tmp_path / "o", "mix", image_dir=fx["image_dir"], progress=False,
                                  sessions={"train": "ImageNetTraining", "test": "ImageNetTest"})


def test_bad_options(fx, tmp_path):
    with pytest.raises(UserError, match="unknown split"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", sessions={"val": "ImageNetTest"})
    with pytest.raises(UserError, match="file_pattern"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", file_pattern="{subject}.h5")
    with pytest.raises(UserError, match="captions table not found"):
        deeprecon.prepare_subject(fx["raw_dir"], tmp_path / "o", "sub-01", captions=tmp_path / "c.tsv")
    _assert_nothing_written(tmp_path / "o")


def test_main_script_lists_subjects_and_prepares(tmp_path, capsys):
    """deeprecon_main.py --list-subjects and --only prepare on the fixture."""
    from pipeline.cli import dataset_main
    from pipeline.common_format import read_split, subject_dir
    from fixtures_deeprecon import make_deeprecon_fixture

    info = make_deeprecon_fixture(tmp_path / "raw")
    subject = sorted(info["subjects"])[0] if isinstance(info.get("subjects"), (list, tuple, dict)) else "sub-01"
    args = ["--raw-dir", str(tmp_path / "raw"), "--set", f"deeprecon.image_dir={info['image_dir']}",
            "--data-dir", str(tmp_path / "data"), "--subject", subject, "--no-progress"]
    assert dataset_main("deeprecon", args + ["--list-subjects"]) == 0
    assert subject in capsys.readouterr().out
    assert dataset_main("deeprecon", args + ["--only", "prepare"]) == 0
    data = read_split(subject_dir(tmp_path / "data", "deeprecon", subject), "art", subject)
    assert len(data) > 0
