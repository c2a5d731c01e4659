"""A tiny THINGS-fMRI1 raw folder in the authors' table format, optionally with the BData conversion.

``make_things_fixture(root)`` follows datasets.md §3.10: per subject, ``betas_csv/sub-XX_ResponseData.h5``
(pandas fixed-format HDF5 via PyTables: rows = voxels, ``voxel_id`` then one float64 column per trial),
``sub-XX_StimulusMetadata.csv`` and ``sub-XX_VoxelMetadata.csv`` (same-named columns as the real file,
including ROI names with spaces and a glasser name with an embedded newline); with ``bdata='single'`` or
``'split'`` also the Kamitani-lab BData conversion written by bdpy under ``bdata/``. Images are JPEGs of
varying, non-square sizes under ``images/object_images/<concept>/``; captions are a wide CSV.
:func:`expected_split` recomputes the averages naively from the returned ground truth.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

ROI_COLUMNS = (
    "V1", "V2", "V3", "hV4", "VO1", "VO2", "LO1 (prf)", "LO2 (prf)", "TO1", "TO2", "V3b", "V3a",
    "lEBA", "rEBA", "lFFA", "rFFA", "lOFA", "rOFA", "lSTS", "rSTS", "lPPA", "rPPA", "lRSC", "rRSC",
    "lTOS", "rTOS", "lLOC", "rLOC", "IT",
)
GLASSER = ("glasser-V1", "glasser-V2", "glasser-p9-\n46v")
CONCEPTS = ("aardvark", "banana", "candelabra", "dog", "easel", "fudge", "mango", "pacifier")
SIZES = ((48, 40), (40, 48), (36, 36), (44, 44))  # (W, H): THINGS images differ in size
N_OUTSIDE = 6  # the first voxels belong to no ROI


def _subject(s) -> str:
    return f"sub-{int(str(s).replace('sub-', '')):02d}"


def _write_bdata(path: Path, values, stim_rows, voxmeta) -> None:
    """The Kamitani conversion (datasets.md §3.8), written from the table data: rows = trials."""
    import bdpy

    stems = [Path(r["stimulus"]).stem for r in stim_rows]
    code_of = {s: float(i) for i, s in enumerate(sorted(set(stems)))}  # 0-based, sorted names
    types = [r["trial_type"] for r in stim_rows]
    sessions = np.array([r["session"] for r in stim_rows], dtype=float)
    runs = np.array([r["run"] for r in stim_rows], dtype=float)
    runs_per_session = runs.max()
    bd = bdpy.BData()
    bd.add(values, "VoxelData")
    bd.add(np.array([r["trial_id"] for r in stim_rows], dtype=float), "trial_id")
    bd.add(sessions, "session")
    bd.add(runs + runs_per_session * (sessions - 1), "run")  # made global across sessions
    bd.add(np.array([{"train": 1.0, "test": 2.0}[t] for t in types]), "trial_type")
    bd.add_vmap("trial_type", {1.0: "train", 2.0: "test"})
    bd.add(np.array([code_of[s] for s in stems]), "stimulus_name")
    bd.add_vmap("stimulus_name", {c: s for s, c in code_of.items()})
    for col in voxmeta.columns:
        bd.add_metadata(col, voxmeta[col].to_numpy(dtype=float), where="VoxelData")
    path.parent.mkdir(parents=True, exist_ok=True)
    bd.save(str(path))


def make_things_fixture(
    root: str | Path,
    subjects=("01",),
    *,
    n_sessions: int = 3,
    n_runs: int = 2,
    train_per_run: int = 2,
    test_per_run: int = 2,
    mask_shape=(10, 12, 8),
    n_voxels: int = 40,
    table: bool = True,
    bdata: str | None = None,
    drop_rois: tuple = (),
    captions: bool = True,
    seed: int = 0,
) -> dict:
    """Write the fixture under ``root``; return its ground truth.

    Design: ``n_sessions × n_runs × (train_per_run + test_per_run)`` trials; every train image is shown
    once, the ``n_runs × test_per_run`` test images once per session. ``bdata``: None, 'single'
    (``bdata/sub-XX.h5``) or 'split' (``bdata/sub-XX_training.h5`` + ``_test.h5``). ``drop_rois`` leaves
    ROI columns out of VoxelMetadata (like sub-03's STS).

    Returns ``{'raw_dir', 'image_dir', 'captions', 'caption_table', 'subjects': {'01': {'responses'
    (n_voxels, n_trials), 'trial_type', 'stimulus', 'roi_columns' {roi: voxel rows}, 'files'}}}``.
    """
    import pandas as pd
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    n_train = n_sessions * n_runs * train_per_run
    n_test = n_runs * test_per_run
    train_names = [f"{CONCEPTS[k % len(CONCEPTS)]}_{k // len(CONCEPTS) + 1:02d}s.jpg" for k in range(n_train)]
    test_names = [f"{CONCEPTS[(2 + j) % len(CONCEPTS)]}_{13 + j}{'sn'[j % 2]}.jpg" for j in range(n_test)]

    image_dir = root / "images" / "object_images"
    paths = {}
    for k, name in enumerate(train_names + test_names):
        w, h = SIZES[k % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        colour = rng.integers(30, 200, 3)
        img = np.clip(colour[None, None, :] + (xx + yy)[..., None], 0, 255).astype(np.uint8)
        p = image_dir / name.rsplit("_", 1)[0] / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, quality=95)
        paths[name] = p

    truth = {"raw_dir": root, "image_dir": root / "images", "train_names": train_names,
             "test_names": test_names, "images": paths, "subjects": {}}
    for subject in subjects:
        s = _subject(subject)
        # voxels: C-order nonzeros of a brain mask
        flat = np.sort(rng.choice(np.prod(mask_shape), n_voxels, replace=False))
        xyz = np.stack(np.unravel_index(flat, mask_shape), axis=1)
        voxmeta = pd.DataFrame({"voxel_id": np.arange(n_voxels), "subject_id": int(s[4:]),
                                "voxel_x": xyz[:, 0], "voxel_y": xyz[:, 1], "voxel_z": xyz[:, 2],
                                "nc_singletrial": rng.uniform(0, 40, n_voxels), "nc_testset": rng.uniform(0, 80, n_voxels),
                                "prf-eccentricity": rng.uniform(0, 10, n_voxels)})
        roi_columns = {}
        for roi in ROI_COLUMNS + GLASSER:
            flag = (rng.random(n_voxels) < 0.2).astype(int)
            flag[:N_OUTSIDE] = 0
            if roi in drop_rois:
                continue
            voxmeta[roi] = flag
            roi_columns[roi] = np.flatnonzero(flag)

        # trials: per session, each test image once; runs mix train and test in random order
        train_queue = list(rng.permutation(train_names))
        stim_rows = []
        for ses in range(1, n_sessions + 1):
            tests = list(rng.permutation(test_names))
            for run in range(1, n_runs + 1):
                trials = [("train", train_queue.pop()) for _ in range(train_per_run)]
                trials += [("test", tests.pop()) for _ in range(test_per_run)]
                for i in rng.permutation(len(trials)):
                    ttype, name = trials[i]
                    stim_rows.append({"trial_type": ttype, "session": ses, "run": run, "subject_id": int(s[4:]),
                                      "trial_id": len(stim_rows), "stimulus": name,
                                      "concept": name.rsplit("_", 1)[0]})
        n_trials = len(stim_rows)
        responses = rng.normal(0, 0.1, (n_voxels, n_trials))
        files = {}
        if table:
            d = root / "betas_csv"
            d.mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame(responses, columns=list(range(n_trials)))
            frame.insert(0, "voxel_id", np.arange(n_voxels, dtype=np.int64))
            files["responses"] = d / f"{s}_ResponseData.h5"
            with warnings.catch_warnings():  # pandas warns that it pickles the mixed column labels
                warnings.simplefilter("ignore")
                frame.to_hdf(files["responses"], key="ResponseData", mode="w")
            files["stimuli"] = d / f"{s}_StimulusMetadata.csv"
            pd.DataFrame(stim_rows).to_csv(files["stimuli"], index=False)
            files["voxels"] = d / f"{s}_VoxelMetadata.csv"
            voxmeta.to_csv(files["voxels"], index=False)
        if bdata == "single":
            files["bdata"] = root / "bdata" / f"{s}.h5"
            _write_bdata(files["bdata"], responses.T, stim_rows, voxmeta)
        elif bdata == "split":
            for split, fname in (("train", "training"), ("test", "test")):
                idx = [i for i, r in enumerate(stim_rows) if r["trial_type"] == split]
                files[f"bdata_{split}"] = root / "bdata" / f"{s}_{fname}.h5"
                _write_bdata(files[f"bdata_{split}"], responses.T[idx], [stim_rows[i] for i in idx], voxmeta)
        elif bdata is not None:
            raise ValueError(f"bdata must be None, 'single' or 'split', got {bdata!r}")
        truth["subjects"][s[4:]] = {
            "responses": responses, "trial_type": [r["trial_type"] for r in stim_rows],
            "stimulus": [r["stimulus"] for r in stim_rows], "session": [r["session"] for r in stim_rows],
            "roi_columns": roi_columns, "files": files,
        }

    truth["captions"] = None
    truth["caption_table"] = {}
    if captions:
        # wide format: image_name + caption1..3; the first train image has no row
        rows = []
        for k, name in enumerate(train_names + test_names):
            if k == 0:
                continue
            caps = [f"a photo of {name[:-4]} number {j}" for j in range(1 + k % 3)]
            truth["caption_table"][Path(name).stem] = caps
            rows.append({"image_name": name, **{f"caption{j + 1}": (caps[j] if j < len(caps) else "") for j in range(3)}})
        truth["captions"] = root / "captions.csv"
        pd.DataFrame(rows).to_csv(truth["captions"], index=False)
    return truth


def expected_split(truth: dict, subject: str, split: str, rois) -> dict:
    """Naive reference: for each image of ``split`` (first appearance in trial order), the mean of its
    trials over the voxel rows in any of ``rois``. Returns ``{'ids', 'fmri', 'nrep', 'rows'}``."""
    info = truth["subjects"][subject]
    rows = np.unique(np.concatenate([info["roi_columns"][r] for r in rois]))
    ids, fmri, nrep = [], [], []
    for t, name in zip(info["trial_type"], info["stimulus"]):
        stem = name[: -len(".jpg")]
        if t == split and stem not in ids:
            ids.append(stem)
    for stem in ids:
        cols = [j for j, (t, n) in enumerate(zip(info["trial_type"], info["stimulus"])) if t == split and n.startswith(stem + ".")]
        fmri.append(info["responses"][np.ix_(rows, cols)].mean(axis=1))
        nrep.append(len(cols))
    return {"ids": ids, "fmri": np.array(fmri), "nrep": np.array(nrep), "rows": rows}
