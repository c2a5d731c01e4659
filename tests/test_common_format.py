"""Common format: round trip, validation messages name the file, atomic writes."""
import numpy as np
import pytest

from pipeline import io
from pipeline.common_format import (SplitData, captions_array, part_path, read_split, subject_dir,
                                    validate_split, write_split)
from pipeline.errors import UserError


def _split(n=4, v=5):
    rng = np.random.default_rng(0)
    return SplitData(fmri=rng.normal(size=(n, v)).astype(np.float64),
                     stim=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
                     cap=captions_array([["a cat", "two cats"], ["a dog"], [], ["x", "y", "z"]][:n]),
                     ids=np.arange(n), nrep=np.array([1, 3, 2, 1][:n]))


def test_round_trip(tmp_path):
    d = subject_dir(tmp_path, "nsd", 1)
    data = _split()
    write_split(d, "train", 1, data)
    back = read_split(d, "train", 1)
    assert back.fmri.dtype == np.float32 and back.nrep.dtype == np.int16
    np.testing.assert_allclose(back.fmri, data.fmri, rtol=1e-6)
    np.testing.assert_array_equal(back.stim, data.stim)
    assert back.cap.shape == (4, 3) and back.cap[2, 0] == "" and back.cap[3, 2] == "z"
    assert part_path(d, "train", "fmri", 1).name == "train_fmriavg_general_sub1.npy"


def test_captions_array_is_fixed_width_unicode():
    arr = captions_array([["héllo wörld"], ["a", "b"]])
    assert arr.dtype.kind == "U" and arr.shape == (2, 2) and arr[0, 1] == ""


def test_validation_names_the_problem(tmp_path):
    data = _split()
    data.fmri[1, 2] = np.nan
    with pytest.raises(UserError, match=r"fmri: 1 non-finite values.*row 1, voxel 2"):
        validate_split(data, tmp_path)
    data = _split()
    data.nrep = data.nrep[:3]
    with pytest.raises(UserError, match="has 3 rows but the other files of this split have 4"):
        validate_split(data)
    data = _split()
    data.stim = data.stim.astype(np.float32)
    with pytest.raises(UserError, match="images must be uint8"):
        validate_split(data)


def test_reader_names_missing_and_bad_files(tmp_path):
    d = subject_dir(tmp_path, "nsd", 2)
    write_split(d, "test", 2, _split())
    part_path(d, "test", "nrep", 2).unlink()
    with pytest.raises(UserError, match=r"test_nrep_sub2.npy: file not found"):
        read_split(d, "test", 2)
    fmri_path = part_path(d, "test", "fmri", 2)
    bad = np.ones((4, 5), dtype=np.float32)
    bad[0, 0] = np.inf
    np.save(fmri_path, bad)
    with pytest.raises(UserError, match=r"test_fmriavg_general_sub2.npy: 1 non-finite"):
        read_split(d, "test", 2, parts=("fmri",))
    np.save(fmri_path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read as a plain numpy array"):
        read_split(d, "test", 2, parts=("fmri",))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with io.atomic_memmap(target, (3, 2), np.float32) as arr:
            arr[0] = 1
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):
        io.save_npy(target, np.array([object()]))
    assert not target.exists()
