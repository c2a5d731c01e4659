"""A tiny NSD mirror written with the real libraries in the real bucket layout (datasets.md §1.11).

``make_nsd_fixture(root)`` writes the design .mat (scipy), stimulus info CSV (pandas), ``imgBrick``
HDF5 (h5py), int16 4-D betas and a -1/0/1 ``nsdgeneral`` ROI (nibabel), COCO caption JSONs and a
curated caption ``.npy``, and returns the ground truth it used plus ``expected(subject, n_sessions)``,
an independent, deliberately naive computation of what the loader should produce.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_SUBJECTS_IN_DESIGN = 8  # subjectim always has 8 rows
MAX_REPEATS = 3


def _layout(s: int) -> dict[str, str]:
    return {
        "roi": f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz",
        "betas": f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{{n:02d}}.nii.gz",
    }


def _masterordering(rng, n_images: int, n_shared: int, n_sessions: int, trials: int) -> np.ndarray:
    """1-based 10k indices, each image at most 3 times; 10k image 1 (shared) and the last 10k image
    (not shared) are shown only in the final session, so dropping it changes both splits."""
    late = [1, n_images]
    others = np.array([k for k in range(1, n_images + 1) if k not in late])
    pool = np.concatenate([rng.permutation(others) for _ in range(MAX_REPEATS)])
    head_len = (n_sessions - 1) * trials
    tail_len = trials - 2 * len(late)
    if len(pool) < head_len + tail_len or tail_len < 0:
        raise ValueError("fixture: too few images for that many trials (raise n_images)")
    tail = np.concatenate([pool[head_len:head_len + tail_len], np.repeat(late, 2)])
    return np.concatenate([pool[:head_len], rng.permutation(tail)]).astype(np.int32)


def make_nsd_fixture(
    root: str | Path,
    subjects=(1, 2),
    n_sessions: int = 3,
    trials_per_session: int = 12,
    n_images: int = 16,
    n_shared: int = 4,
    shape=(6, 7, 5),
    image_size: int = 32,
    seed: int = 0,
) -> dict:
    """Write the fixture under ``root`` and return its ground truth (see module docstring)."""
    import h5py
    import nibabel as nib
    import pandas as pd
    from scipy.io import savemat

    root = Path(root)
    rng = np.random.default_rng(seed)
    n_specific = n_images - n_shared
    n_pool = n_shared + N_SUBJECTS_IN_DESIGN * n_specific  # the "73k" pool

    # design: the same shared ids, in the same order, open every row (as on the real file, so the
    # test order is common to all subjects); the rest is per subject.  The two images shown only in
    # the last session (10k positions 1 and n_images) get the smallest id of their split, so the
    # order of first appearance can never coincide with sorted order.
    pool_ids = rng.permutation(n_pool) + 1  # 1-based
    shared = np.sort(pool_ids[:n_shared])
    subjectim = np.zeros((N_SUBJECTS_IN_DESIGN, n_images), dtype=np.int32)
    for row in range(N_SUBJECTS_IN_DESIGN):
        specific = pool_ids[n_shared + row * n_specific: n_shared + (row + 1) * n_specific]
        subjectim[row] = np.concatenate([shared, np.sort(specific)[::-1]])
    master = _masterordering(rng, n_images, n_shared, n_sessions, trials_per_session)
    n_trials = n_sessions * trials_per_session
    design_path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    design_path.parent.mkdir(parents=True, exist_ok=True)
    savemat(design_path, {
        "masterordering": master[None, :],
        "subjectim": subjectim,
        "sharedix": np.sort(shared)[None, :].astype(np.int32),
        "basiccnt": np.zeros((3, n_sessions)),
        "stimpattern": np.zeros((n_sessions, 12, 75), dtype=np.uint8),
    })

    # stimuli
    images = rng.integers(0, 256, size=(n_pool, image_size, image_size, 3), dtype=np.uint8)
    stim_path = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    stim_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(stim_path, "w") as fh:
        fh.create_dataset("imgBrick", data=images)

    # COCO captions: 3-7 per image (more than 5 on some, as in COCO), split over train/val
    coco_ids = rng.choice(np.arange(1, 600_000), size=n_pool, replace=False)
    coco_split = np.where(rng.random(n_pool) < 0.3, "val2017", "train2017")
    coco_captions = []
    files = {"train2017": {"images": [], "annotations": []}, "val2017": {"images": [], "annotations": []}}
    ann_id = 1
    for i in range(n_pool):
        caps = [f"image {i} caption {j} with words" for j in range(int(rng.integers(3, 8)))]
        coco_captions.append(caps)
        files[coco_split[i]]["images"].append({"id": int(coco_ids[i]), "file_name": f"{coco_ids[i]:012d}.jpg", "height": 480, "width": 640})
        for cap in caps:
            files[coco_split[i]]["annotations"].append({"image_id": int(coco_ids[i]), "id": ann_id, "caption": cap})
            ann_id += 1
    for content in files.values():  # interleave images, as in the real files
        content["annotations"] = [content["annotations"][i] for i in rng.permutation(len(content["annotations"]))]
    coco_expected = [[] for _ in range(n_pool)]  # every caption of each image, in file order
    by_coco = {(coco_split[i], int(coco_ids[i])): i for i in range(n_pool)}
    for split, content in files.items():
        for ann in content["annotations"]:
            coco_expected[by_coco[(split, ann["image_id"])]].append(ann["caption"])
    ann_dir = root / "nsddata_stimuli/stimuli/nsd/annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split, content in files.items():
        (ann_dir / f"captions_{split}.json").write_text(json.dumps({"info": {}, "licenses": [], **content}))

    # curated captions (n_pool, 5) unicode, '' padded, different text from COCO so tests can tell them apart
    curated = np.full((n_pool, 5), "", dtype="<U40")
    for i in range(n_pool):
        for j in range(int(rng.integers(1, 6))):
            curated[i, j] = f"curated {i}.{j}"
    curated_path = root / "COCO_73k_annots_curated.npy"
    np.save(curated_path, curated)

    # stimulus info CSV (index = nsdId, unnamed first column)
    info = pd.DataFrame({
        "cocoId": coco_ids, "cocoSplit": coco_split, "cropBox": "(0, 0, 0.1671875, 0.1671875)",
        "loss": 0.0, "nsdId": np.arange(n_pool), "flagged": False, "BOLD5000": False,
        "shared1000": np.isin(np.arange(n_pool), shared - 1),
    })
    for k in range(1, N_SUBJECTS_IN_DESIGN + 1):
        info[f"subject{k}"] = np.isin(np.arange(n_pool), subjectim[k - 1] - 1).astype(int)
    for k in range(1, N_SUBJECTS_IN_DESIGN + 1):
        reps = np.zeros((n_pool, MAX_REPEATS), dtype=int)
        seen = np.zeros(n_pool, dtype=int)
        for t in range(n_trials):
            nsd = subjectim[k - 1, master[t] - 1] - 1
            reps[nsd, seen[nsd]] = t + 1
            seen[nsd] += 1
        for r in range(MAX_REPEATS):
            info[f"subject{k}_rep{r}"] = reps[:, r]
    info.to_csv(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv")

    # per subject: ROI (-1 outside cortex, 0 cortex, 1 nsdgeneral) and int16 betas
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    roi, betas = {}, {}
    for s in subjects:
        paths = _layout(s)
        r = np.full(shape, -1.0, dtype=np.float32)
        r[1:-1, 1:-1, :] = 0.0
        inner = rng.random(shape) < 0.5
        r[1:-1, 1:-1, :][inner[1:-1, 1:-1, :]] = 1.0
        brain = r >= 0
        (root / paths["roi"]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(r, affine), root / paths["roi"])
        sessions = []
        for n in range(1, n_sessions + 1):
            psc = rng.normal(0.0, 1.5, size=(*shape, trials_per_session))
            b = np.where(brain[..., None], np.round(psc * 300), 0).astype(np.int16)
            path = root / paths["betas"].format(n=n)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(b, affine), path)
            sessions.append(b)
        roi[s], betas[s] = r, sessions

    truth = {
        "root": root, "subjects": tuple(subjects), "n_sessions": n_sessions,
        "trials_per_session": trials_per_session, "n_shared": n_shared, "image_size": image_size,
        "masterordering": master, "subjectim": subjectim, "shared_ids": np.sort(shared) - 1,
        "images": images, "coco_captions": coco_captions, "coco_expected": coco_expected, "curated": curated, "curated_path": curated_path,
        "roi": roi, "betas": betas,
    }
    truth["expected"] = lambda subject, n=n_sessions: expected_output(truth, subject, n)
    return truth


def expected_output(truth: dict, subject: int, n_sessions: int) -> dict:
    """Naive re-computation: lists in first-appearance order, explicit voxel loop, plain means."""
    roi = truth["roi"][subject]
    voxels = [(x, y, z) for x in range(roi.shape[0]) for y in range(roi.shape[1]) for z in range(roi.shape[2]) if roi[x, y, z] > 0]
    trials = []  # (nsd id, split, response over voxels)
    for n in range(n_sessions):
        b = truth["betas"][subject][n]
        for j in range(b.shape[3]):
            g = n * truth["trials_per_session"] + j
            k10 = int(truth["masterordering"][g])
            nsd = int(truth["subjectim"][subject - 1, k10 - 1]) - 1
            split = "train" if k10 > truth["n_shared"] else "test"
            trials.append((nsd, split, np.array([float(b[x, y, z, j]) for x, y, z in voxels])))
    out = {}
    for split in ("train", "test"):
        ids = []
        for nsd, sp, _ in trials:
            if sp == split and nsd not in ids:
                ids.append(nsd)
        groups = [[v for nsd, sp, v in trials if sp == split and nsd == i] for i in ids]
        out[split] = {
            "ids": np.array(ids),
            "nrep": np.array([len(g) for g in groups]),
            "fmri": np.array([np.mean(g, axis=0) for g in groups]),
            "stim": truth["images"][ids],
        }
    out["n_voxels"] = len(voxels)
    return out
