"""NSD preparation (split, averaging, voxel order, captions, errors) and the resumable downloader."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import common_format as cf
from pipeline.errors import UserError
from prepare_data import download_nsd as dl
from prepare_data import nsd
from tests.fixtures_nsd import make_nsd_fixture


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_nsd_fixture(tmp_path_factory.mktemp("nsd_raw"))


@pytest.fixture(scope="module")
def prepared(fx, tmp_path_factory):
    """Subject 1 with all 3 sessions and COCO captions."""
    out = tmp_path_factory.mktemp("nsd_out") / "sub1"
    summary = nsd.prepare_subject(fx["root"], out, 1, n_sessions=3, progress=False)
    return out, summary


def test_split_order_counts_and_means(fx, prepared):
    out, summary = prepared
    exp = fx["expected"](1, 3)
    for split in ("train", "test"):
        data = cf.read_split(out, split, 1)
        assert not np.array_equal(exp[split]["ids"], np.sort(exp[split]["ids"]))  # order is first appearance
        np.testing.assert_array_equal(data.ids, exp[split]["ids"])
        np.testing.assert_array_equal(data.nrep, exp[split]["nrep"])
        np.testing.assert_allclose(data.fmri, exp[split]["fmri"], rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(data.stim), exp[split]["stim"])
        assert data.fmri.dtype == np.float32 and data.stim.dtype == np.uint8
        assert data.nrep.dtype == np.int16 and data.cap.dtype.kind == "U"
        assert np.issubdtype(data.ids.dtype, np.integer)
        assert data.stim.shape[1:] == (fx["image_size"], fx["image_size"], 3)
    # test = shared images, train = the rest; each image appears in one split only
    test_ids = cf.read_split(out, "test", 1, parts=("ids",)).ids
    assert set(test_ids.tolist()) == set(fx["shared_ids"].tolist())
    assert summary["n_train"] == len(exp["train"]["ids"]) and summary["n_test"] == len(exp["test"]["ids"])
    assert summary["n_voxels"] == exp["n_voxels"] == int((fx["roi"][1] > 0).sum())
    assert summary["n_train_trials"] + summary["n_test_trials"] == 3 * fx["trials_per_session"]
    # values stay in file units (int16 x 300), not percent signal change
    assert np.abs(cf.read_split(out, "train", 1, parts=("fmri",)).fmri).max() > 50


def test_manifest_records_sources_and_summary(fx, prepared):
    out, summary = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["roi"] == "nsdgeneral" and manifest["n_sessions"] == 3
    assert manifest["n_voxels"] == summary["n_voxels"]
    assert any(s.endswith("betas_session03.nii.gz") for s in manifest["sources"])
    assert any(s.endswith("nsd_expdesign.mat") for s in manifest["sources"])


def test_voxel_order_is_c_order_of_the_mask(fx, prepared):
    """Train row 0 equals the mean of its trials' volumes read in C order (and F order would differ)."""
    out, _ = prepared
    data = cf.read_split(out, "train", 1, parts=("fmri", "ids", "nrep"))
    mask = fx["roi"][1] > 0
    master, subjectim = fx["masterordering"], fx["subjectim"]
    trials = [(n, j) for n in range(3) for j in range(fx["trials_per_session"])]
    nsd_of = [subjectim[0, master[n * fx["trials_per_session"] + j] - 1] - 1 for n, j in trials]
    row = 0
    hits = [t for t, i in zip(trials, nsd_of) if i == data.ids[row]]
    vols = np.stack([fx["betas"][1][n][..., j] for n, j in hits]).astype(np.float64).mean(0)
    np.testing.assert_allclose(data.fmri[row], vols[mask], rtol=1e-6)
    assert not np.allclose(vols[mask], vols.transpose(2, 1, 0)[mask.transpose(2, 1, 0)])


def test_n_sessions_changes_the_split(fx, tmp_path):
    summary = nsd.prepare_subject(fx["root"], tmp_path, 1, n_sessions=2, progress=False)
    exp2, exp3 = fx["expected"](1, 2), fx["expected"](1, 3)
    for split in ("train", "test"):
        data = cf.read_split(tmp_path, split, 1, parts=("ids", "nrep", "fmri"))
        np.testing.assert_array_equal(data.ids, exp2[split]["ids"])
        np.testing.assert_array_equal(data.nrep, exp2[split]["nrep"])
        np.testing.assert_allclose(data.fmri, exp2[split]["fmri"], rtol=1e-6, atol=1e-4)
        assert len(exp2[split]["ids"]) < len(exp3[split]["ids"])
    assert summary["n_sessions"] == 2 and summary["n_trials"] == 2 * fx["trials_per_session"]


def test_captions_from_coco_json(fx, prepared):
    out, summary = prepared
    assert summary["captions"] == "coco_json"
    for split in ("train", "test"):
        data = cf.read_split(out, split, 1, parts=("ids", "cap"))
        # every caption is kept (3-7 per image in the fixture), '' padded to the longest row
        assert data.cap.shape[1] == max(len(fx["coco_captions"][i]) for i in data.ids)
        for i, row in zip(data.ids, data.cap):
            expected = fx["coco_expected"][i]
            assert [c for c in row if c] == expected
            assert sorted(expected) == sorted(fx["coco_captions"][i])
    assert max(len(c) for c in fx["coco_captions"]) > 5  # the fixture has images with more than 5


def test_captions_from_curated_npy(fx, tmp_path):
    summary = nsd.prepare_subject(fx["root"], tmp_path, "02", n_sessions=3, captions=fx["curated_path"], progress=False)
    assert summary["captions"] == "curated_npy"
    data = cf.read_split(tmp_path, "test", "02", parts=("ids", "cap"))  # files named as the subject was given
    for i, row in zip(data.ids, data.cap):
        assert [c for c in row if c] == [c for c in fx["curated"][i] if c]
    # same shared test images for every subject, in the same order (masterordering is common)
    np.testing.assert_array_equal(data.ids, fx["expected"](1, 3)["test"]["ids"])


def test_pickled_caption_array_is_refused_with_advice(fx, tmp_path):
    bad = tmp_path / "annots.npy"
    np.save(bad, np.array(fx["curated"].tolist(), dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="pickle.*astype\\(str\\)"):
        nsd.prepare_subject(fx["root"], tmp_path / "out", 1, n_sessions=3, captions=bad, progress=False)


def test_unknown_subject_lists_present_ones(fx, tmp_path):
    with pytest.raises(UserError, match="subject 5 .*subjects present: 1, 2"):
        nsd.prepare_subject(fx["root"], tmp_path, 5, n_sessions=3, progress=False)
    assert nsd.parse_subject("subj02") == 2 == nsd.parse_subject("02")


def test_missing_files_are_named(fx, tmp_path):
    with pytest.raises(UserError, match="betas_session04.nii.gz"):
        nsd.prepare_subject(fx["root"], tmp_path, 1, n_sessions=4, progress=False)
    raw = tmp_path / "raw"
    make_nsd_fixture(raw, subjects=(1,), n_sessions=2, trials_per_session=8, n_images=10, n_shared=3)
    (raw / nsd.EXPDESIGN).unlink()
    with pytest.raises(UserError, match="nsd_expdesign.mat"):
        nsd.prepare_subject(raw, tmp_path / "out", 1, n_sessions=2, progress=False)


def test_nan_betas_raise_and_write_nothing(tmp_path):
    raw = tmp_path / "raw"
    truth = make_nsd_fixture(raw, subjects=(1,), n_sessions=2, trials_per_session=8, n_images=10, n_shared=3)
    path = raw / nsd.BETAS.format(s=1, n=2)
    vol = truth["betas"][1][1].astype(np.float32)
    (x0, y0, z0), (x1, y1, z1) = np.argwhere(truth["roi"][1] > 0)[:2]
    vol[x0, y0, z0, 3] = vol[x1, y1, z1, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"betas_session02.nii.gz: 2 nsdgeneral voxels hold NaN"):
        nsd.prepare_subject(raw, out, 1, n_sessions=2, progress=False)
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------ download


def test_plan_lists_the_needed_keys():
    files = dl.plan([1, "subj02"], 3)
    keys = [f.key for f in files]
    assert "nsddata/experiments/nsd/nsd_expdesign.mat" in keys
    assert "nsddata/experiments/nsd/nsd_stim_info_merged.csv" in keys
    assert "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5" in keys
    for s in ("01", "02"):
        assert f"nsddata/ppdata/subj{s}/func1pt8mm/roi/nsdgeneral.nii.gz" in keys
        betas = [k for k in keys if k.startswith(f"nsddata_betas/ppdata/subj{s}/func1pt8mm/betas_fithrf_GLMdenoise_RR/")]
        assert betas == [f"nsddata_betas/ppdata/subj{s}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{n:02d}.nii.gz" for n in (1, 2, 3)]
    coco = [f for f in files if f.url]
    assert len(coco) == 1 and coco[0].url == dl.COCO_ANNOTATIONS_URL and set(coco[0].extract) == set(dl.COCO_MEMBERS)
    assert len(keys) == len(set(keys)) == 3 + 1 + 2 * (1 + 3)
    lean = [f.key for f in dl.plan([7], 37, include_stimuli=False, include_captions=False)]
    assert len(lean) == 1 + 1 + 37 and not any("hdf5" in k or "csv" in k or "zip" in k for k in lean)
    # the files the downloader fetches are the files the loader reads
    assert set(keys) >= {nsd.EXPDESIGN, nsd.STIM_INFO, nsd.STIMULI, nsd.ROI.format(s=1), nsd.BETAS.format(s=2, n=3)}
    with pytest.raises(UserError, match="only 32 sessions"):
        dl.plan([3], 37)


def _mirror(fx, tmp_path) -> tuple[Path, list]:
    """A bucket-shaped mirror made from the fixture, with the COCO JSONs zipped like the COCO archive."""
    mirror = fx["root"]
    archive = mirror / dl.COCO_ZIP_KEY
    if not archive.exists():
        with zipfile.ZipFile(archive, "w") as zf:
            for member in dl.COCO_MEMBERS:
                zf.write(mirror / "nsddata_stimuli/stimuli/nsd" / member, member)
    return mirror, dl.plan([1, 2], 3)


def test_dry_run_prints_total(fx, tmp_path, capsys):
    mirror, files = _mirror(fx, tmp_path)
    status = dl.download(files, tmp_path / "dest", dl.LocalMirror(mirror), dry_run=True)
    total = sum((mirror / f.key).stat().st_size for f in files)
    out = capsys.readouterr().out
    assert f"{len(files)} files, {dl._human(total)} in total" in out
    assert set(status.values()) == {"missing"} and not (tmp_path / "dest").exists()


def test_local_download_skip_and_resume(fx, tmp_path):
    mirror, files = _mirror(fx, tmp_path)
    dest = tmp_path / "dest"
    status = dl.download(files, dest, dl.LocalMirror(mirror), progress=False)
    assert set(status.values()) == {"downloaded"}
    for f in files:
        assert (dest / f.key).read_bytes() == (mirror / f.key).read_bytes()
    for member in dl.COCO_MEMBERS:  # extracted where the loader looks for them
        assert (dest / "nsddata_stimuli/stimuli/nsd" / member).read_bytes() == (mirror / "nsddata_stimuli/stimuli/nsd" / member).read_bytes()

    again = dl.download(files, dest, dl.LocalMirror(mirror), progress=False)
    assert set(again.values()) == {"skipped"}

    # a partial .part is resumed, a truncated final file is redone
    stim = next(f for f in files if f.key == nsd.STIMULI)
    final = dest / stim.key
    data = final.read_bytes()
    final.unlink()
    part = final.with_name(final.name + ".part")
    part.write_bytes(data[: len(data) // 3])
    roi = dest / nsd.ROI.format(s=1)
    roi.write_bytes(roi.read_bytes()[:10])
    status = dl.download(files, dest, dl.LocalMirror(mirror), progress=False)
    assert status[stim.key] == "resumed" and status[nsd.ROI.format(s=1)] == "downloaded"
    assert final.read_bytes() == data and not part.exists()
    assert roi.read_bytes() == (mirror / nsd.ROI.format(s=1)).read_bytes()

    # and the downloaded tree is a valid raw_dir for the loader
    summary = nsd.prepare_subject(dest, tmp_path / "out", 2, n_sessions=3, progress=False)
    assert summary["n_test"] == len(fx["expected"](2, 3)["test"]["ids"])


class _BrokenMirror(dl.LocalMirror):
    """A transport whose connection drops after ``limit`` bytes of each file."""

    def __init__(self, root, limit):
        super().__init__(root)
        self.limit = limit

    def fetch(self, f, offset=0):
        start, chunks = super().fetch(f, offset)

        def cut():
            data = b"".join(chunks)
            yield data[: self.limit]
            raise ConnectionResetError("connection reset by peer")

        return start, cut()


def test_interrupted_download_leaves_only_part_then_resumes(fx, tmp_path):
    mirror, _ = _mirror(fx, tmp_path)
    files = [dl.RemoteFile(nsd.STIMULI)]
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="interrupted after 1000 bytes"):
        dl.download(files, dest, _BrokenMirror(mirror, 1000), progress=False)
    final = dest / nsd.STIMULI
    assert not final.exists()
    assert final.with_name(final.name + ".part").stat().st_size == 1000
    status = dl.download(files, dest, dl.LocalMirror(mirror), progress=False)
    assert status == {nsd.STIMULI: "resumed"}
    assert final.read_bytes() == (mirror / nsd.STIMULI).read_bytes()


def test_cli_dry_run_and_user_errors(fx, tmp_path, capsys):
    mirror, _ = _mirror(fx, tmp_path)
    rc = dl.main(["--subjects", "1", "2", "--sessions", "3", "--dest", str(tmp_path / "d"), "--mirror", str(mirror), "--dry-run"])
    assert rc == 0 and "in total" in capsys.readouterr().out
    rc = dl.main(["--subjects", "4", "--sessions", "37", "--dest", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "only 30 sessions" in err
    rc = dl.main(["--sessions", "3"])
    assert rc == 2 and "--dest" in capsys.readouterr().err


class _RangeHandler:
    """Build a local HTTP handler class serving ``root``; with ``ranges`` it honours ``Range: bytes=N-``."""

    @staticmethod
    def make(root: Path, ranges: bool):
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                spec = self.headers.get("Range")
                path = Path(self.translate_path(self.path))
                if not (ranges and spec and path.is_file()):
                    return super().do_GET()
                start = int(spec.removeprefix("bytes=").rstrip("-"))
                body = path.read_bytes()[start:]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.mark.parametrize("ranges", [True, False])
def test_http_transport_sizes_and_resume(fx, tmp_path, ranges):
    """HEAD gives the size; a .part resumes with Range, or restarts when the server ignores it."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler.make(fx["root"], ranges))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        transport = dl.HttpTransport(base_url=f"http://127.0.0.1:{server.server_address[1]}", timeout=10)
        files = [dl.RemoteFile(nsd.STIMULI), dl.RemoteFile(nsd.EXPDESIGN)]
        src = fx["root"] / nsd.STIMULI
        assert transport.size(files[0]) == src.stat().st_size
        dest = tmp_path / "dest"
        part = dest / (nsd.STIMULI + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(src.read_bytes()[:5000])
        status = dl.download(files, dest, transport, progress=False)
        assert status == {nsd.STIMULI: "resumed" if ranges else "downloaded", nsd.EXPDESIGN: "downloaded"}
        assert (dest / nsd.STIMULI).read_bytes() == src.read_bytes()
        with pytest.raises(UserError, match="HTTP 404"):
            dl.download([dl.RemoteFile("nsddata/no_such_file.mat")], dest, transport, progress=False)
    finally:
        server.shutdown()
        server.server_close()


def test_main_script_lists_subjects_and_prepares(tmp_path, capsys):
    """nsd_main.py --list-subjects and --only prepare --subject 1 on the fixture."""
    from fixtures_nsd import make_nsd_fixture
    from pipeline.cli import dataset_main
    from pipeline.common_format import read_split, subject_dir

    make_nsd_fixture(tmp_path / "raw")
    args = ["--raw-dir", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data"), "--subject", "1",
            "--set", "nsd.n_sessions=3", "--no-progress"]
    assert dataset_main("nsd", args + ["--list-subjects"]) == 0
    assert "1, 2" in capsys.readouterr().out
    assert dataset_main("nsd", args + ["--only", "prepare"]) == 0
    assert len(read_split(subject_dir(tmp_path / "data", "nsd", "1"), "test", "1")) > 0

