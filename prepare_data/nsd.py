"""NSD raw files → common format, with exactly the Brain-Diffuser split (method.md §1, datasets.md §1).

For one subject, trial ``g`` (0-based, sessions concatenated in order) shows the subject's 10k image
``k = masterordering[g]`` (1-based) whose 73k id is ``subjectim[subject-1, k-1] - 1``.  Trials with
``k > n_shared`` (1000 on the real file: the shared images are the first ``len(sharedix)`` entries of
every ``subjectim`` row) go to ``train``, the others to ``test``.  Images keep the order of their first
appearance in the trial sequence, and each image's response is the plain mean of its trials over the
``nsdgeneral > 0`` voxels (C order of the volume), in the file's units (int16 = % signal change × 300;
no division by 300 here, that happens in the regression step).

Memory: one session NIfTI is decoded at a time and folded into per-image sums; images are read from
``imgBrick`` by index in small sorted chunks straight into a memory-mapped output — never the whole brick.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import common_format as cf
from pipeline import io
from pipeline.errors import UserError

# Bucket-relative paths (datasets.md §1.2); the raw directory mirrors the bucket layout.
EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
COCO_CAPTIONS = "nsddata_stimuli/stimuli/nsd/annotations/captions_{split}.json"
ROI = "nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"
BETAS_DIR = "nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
BETAS = BETAS_DIR + "/betas_session{n:02d}.nii.gz"

ROI_NAME = "nsdgeneral"
DEFAULT_N_SHARED = 1000  # used only if the design file lacks `sharedix`
IMAGE_CHUNK = 64  # images per HDF5 read


def parse_subject(subject: int | str) -> int:
    """Accept 1, '1', '01' or 'subj01'; return the 1-based subject number."""
    text = str(subject).strip().lower()
    for prefix in ("subj", "sub"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"NSD subject {subject!r}: expected a positive number such as 1 or 'subj01'")
    return int(text)


def subjects_present(raw_dir: str | os.PathLike) -> list[int]:
    """Subjects with both a betas folder and an nsdgeneral ROI under ``raw_dir``."""
    raw_dir = Path(raw_dir)
    found = []
    for folder in sorted((raw_dir / "nsddata_betas" / "ppdata").glob("subj*")):
        try:
            s = parse_subject(folder.name)
        except UserError:
            continue
        if (raw_dir / BETAS_DIR.format(s=s)).is_dir() and (raw_dir / ROI.format(s=s)).is_file():
            found.append(s)
    return found


# --------------------------------------------------------------------------------------------- design


def load_design(path: str | os.PathLike) -> dict:
    """Read ``nsd_expdesign.mat``: masterordering (n_trials,) and subjectim (8, 10000), both 1-based."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: NSD design file not found (download it with prepare_data/download_nsd.py)")
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises several types for corrupt/v7.3 files
        raise UserError(f"{path}: cannot read as a MATLAB v5 file ({exc})") from None
    for key in ("masterordering", "subjectim"):
        if key not in mat:
            raise UserError(f"{path}: key {key!r} missing (found {sorted(k for k in mat if not k.startswith('__'))})")
    master = np.asarray(mat["masterordering"]).astype(np.int64).ravel()
    subjectim = np.atleast_2d(np.asarray(mat["subjectim"]).astype(np.int64))
    n_shared = int(np.asarray(mat["sharedix"]).size) if "sharedix" in mat else DEFAULT_N_SHARED
    if master.min() < 1 or master.max() > subjectim.shape[1]:
        raise UserError(f"{path}: masterordering values must lie in 1..{subjectim.shape[1]} (1-based)")
    return {"masterordering": master, "subjectim": subjectim, "n_shared": n_shared}


def assign_trials(master: np.ndarray, subjectim_row: np.ndarray, n_trials: int, n_shared: int) -> dict:
    """Map trials 0..n_trials-1 to (split, row), rows in order of first appearance.

    Returns ``{"train": ids, "test": ids, "split": (n_trials,) 0=train/1=test, "row": (n_trials,)}``
    with ``ids`` the 0-based 73k ids of each split's rows.
    """
    rows = {"train": {}, "test": {}}
    split_of = np.empty(n_trials, dtype=np.int8)
    row_of = np.empty(n_trials, dtype=np.int64)
    for g in range(n_trials):
        k10 = int(master[g])
        nsd_id = int(subjectim_row[k10 - 1]) - 1
        split = "train" if k10 > n_shared else "test"
        table = rows[split]
        row_of[g] = table.setdefault(nsd_id, len(table))
        split_of[g] = 0 if split == "train" else 1
    return {
        "train": np.fromiter(rows["train"], dtype=np.int64, count=len(rows["train"])),
        "test": np.fromiter(rows["test"], dtype=np.int64, count=len(rows["test"])),
        "split": split_of,
        "row": row_of,
    }


# ----------------------------------------------------------------------------------------------- fMRI


def _read_nifti(path: Path, read):
    """``read(nib.load(path))``; a corrupt or truncated NIfTI is a UserError naming the file."""
    import nibabel as nib

    try:
        return read(nib.load(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        text = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {text}); the file is "
                        "truncated or corrupt: download it again") from None


def load_roi(path: Path) -> np.ndarray:
    """Boolean (X, Y, Z) mask ``nsdgeneral > 0`` (values are -1 / 0 / 1 on the real files)."""
    if not path.is_file():
        raise UserError(f"{path}: ROI file not found")
    mask = _read_nifti(path, lambda img: np.asarray(img.get_fdata())) > 0
    if mask.ndim != 3 or not mask.any():
        raise UserError(f"{path}: expected a 3-D ROI with some voxels > 0, got shape {mask.shape}, {mask.sum()} voxels")
    return mask


def session_trial_counts(paths: list[Path], grid: tuple[int, int, int]) -> list[int]:
    """Trials per session from the NIfTI headers (750 on real files; read, never assumed)."""
    counts = []
    for path in paths:
        shape = _read_nifti(path, lambda img: img.shape)
        if len(shape) != 4 or tuple(shape[:3]) != tuple(grid):
            raise UserError(f"{path}: expected betas of shape {tuple(grid)} x n_trials like the ROI, got {shape}")
        counts.append(int(shape[3]))
    return counts


def masked_session(path: Path, mask: np.ndarray) -> np.ndarray:
    """(n_trials, n_voxel) float64 betas of one session in file units (C-order voxels)."""
    # asanyarray(dataobj) applies any header scaling just like get_fdata(), but keeps int16
    # when there is none: 1 GB per real session instead of 4 GB.
    out = _read_nifti(path, lambda img: np.asanyarray(img.dataobj)[mask].T.astype(np.float64))
    bad = ~np.isfinite(out)
    if bad.any():
        n_vox = int(bad.any(axis=0).sum())
        raise UserError(f"{path}: {n_vox} {ROI_NAME} voxels hold NaN/inf values; the average would be NaN")
    return out


# -------------------------------------------------------------------------------------------- stimuli


def write_stimuli(h5_path: Path, ids: np.ndarray, out_path: Path, progress: bool, label: str) -> tuple[int, int]:
    """Copy ``imgBrick[ids]`` (n, H, W, 3) uint8 into ``out_path`` chunk by chunk; return (H, W)."""
    import h5py

    with h5py.File(h5_path, "r") as fh:
        if "imgBrick" not in fh:
            raise UserError(f"{h5_path}: dataset 'imgBrick' missing (found {sorted(fh.keys())})")
        brick = fh["imgBrick"]
        if brick.ndim != 4 or brick.shape[-1] != 3 or brick.dtype != np.uint8:
            raise UserError(f"{h5_path}: imgBrick must be uint8 (n, H, W, 3), got {brick.dtype} {brick.shape}")
        if len(ids) and int(ids.max()) >= brick.shape[0]:
            raise UserError(f"{h5_path}: image id {int(ids.max())} is outside imgBrick's {brick.shape[0]} images")
        height, width = int(brick.shape[1]), int(brick.shape[2])
        order = np.argsort(ids, kind="stable")  # h5py wants increasing indices
        with io.atomic_memmap(out_path, (len(ids), height, width, 3), np.uint8) as out:
            starts = range(0, len(ids), IMAGE_CHUNK)
            for start in tqdm(starts, desc=f"{label} images", unit="chunk", disable=not progress):
                rows = order[start:start + IMAGE_CHUNK]
                out[rows] = brick[ids[rows]]
    return height, width


# ------------------------------------------------------------------------------------------- captions


def _coco_captions(raw_dir: Path, ids_by_split: dict[str, np.ndarray]) -> tuple[dict[str, list[list[str]]], list[Path]]:
    """Captions of each image from the COCO 2017 JSONs via ``nsd_stim_info_merged.csv`` (cocoId, cocoSplit)."""
    import pandas as pd

    info_path = raw_dir / STIM_INFO
    if not info_path.is_file():
        raise UserError(f"{info_path}: NSD stimulus info file not found (needed for COCO captions)")
    info = pd.read_csv(info_path, index_col=0)
    for col in ("cocoId", "cocoSplit"):
        if col not in info.columns:
            raise UserError(f"{info_path}: column {col!r} missing")
    all_ids = np.concatenate(list(ids_by_split.values()))
    if len(all_ids) and int(all_ids.max()) >= len(info):
        raise UserError(f"{info_path}: has {len(info)} rows but image id {int(all_ids.max())} is needed")
    coco_id = info["cocoId"].to_numpy()
    coco_split = info["cocoSplit"].astype(str).to_numpy()

    needed: dict[str, set[int]] = {}
    for nsd_id in all_ids:
        needed.setdefault(coco_split[nsd_id], set()).add(int(coco_id[nsd_id]))
    sources = []
    found: dict[tuple[str, int], list[str]] = {}
    for split, wanted in sorted(needed.items()):
        path = raw_dir / COCO_CAPTIONS.format(split=split)
        if not path.is_file():
            raise UserError(
                f"{path}: COCO caption file not found (from annotations_trainval2017.zip; "
                "download_nsd.py fetches it, or pass a curated captions .npy)"
            )
        try:
            annotations = json.loads(path.read_text())["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a COCO caption file ({exc!r})") from None
        for n, ann in enumerate(annotations):  # file order; every caption is kept (5-7 per COCO image),
            try:                                # '' padded later; the features step chooses how many to encode
                key = (split, int(ann["image_id"]))
                caption = str(ann["caption"]).strip()
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{path}: annotation #{n} has no usable image_id/caption ({type(exc).__name__}: "
                                f"{exc}); not a COCO caption file") from None
            if key[1] in wanted:
                found.setdefault(key, []).append(caption)
        sources.append(path)
    out = {
        split: [found.get((coco_split[i], int(coco_id[i])), []) for i in ids]
        for split, ids in ids_by_split.items()
    }
    return out, [info_path, *sources]


def _curated_captions(path: Path, ids_by_split: dict[str, np.ndarray]) -> dict[str, list[list[str]]]:
    """Rows of a (73000, n_cap) caption array such as ``COCO_73k_annots_curated.npy``."""
    if not path.is_file():
        raise UserError(f"{path}: caption file not found")
    try:
        table = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError:
        raise UserError(
            f"{path}: this caption array is stored as Python objects and would need pickle to load; "
            "convert it once from a copy you trust: python -c \"import numpy as np; "
            f"a = np.load('{path}', allow_pickle=True); np.save('{path.with_suffix('')}_str.npy', a.astype(str))\" "
            "and pass the _str.npy file"
        ) from None
    if table.ndim != 2 or table.dtype.kind not in "US":
        raise UserError(f"{path}: expected a 2-D string array (73000, n_cap), got {table.dtype} {table.shape}")
    all_ids = np.concatenate(list(ids_by_split.values()))
    if len(all_ids) and int(all_ids.max()) >= table.shape[0]:
        raise UserError(f"{path}: has {table.shape[0]} rows but image id {int(all_ids.max())} is needed")

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return {
        split: [[text(c).strip() for c in table[i] if text(c).strip()] for i in ids]
        for split, ids in ids_by_split.items()
    }


# ----------------------------------------------------------------------------------------------- main


def prepare_subject(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    subject: int | str,
    *,
    n_sessions: int = 37,
    captions: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Write ``train``/``test`` splits of one NSD subject in the common format to ``out_dir``.

    ``raw_dir`` mirrors the NSD bucket; ``n_sessions`` = 37 reproduces Brain-Diffuser (8,859 train /
    982 test images), 40 uses all released sessions (1,000 test).  ``captions`` = None (or '') reads the COCO
    2017 JSONs; a path reads a curated (73000, n_cap) string ``.npy``.  Returns the summary that is
    also stored in ``manifest.json``.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    s = parse_subject(subject)
    label = str(subject).strip()  # file names use the subject as the pipeline spells it (sub<label>)
    if not isinstance(n_sessions, (int, np.integer)) or n_sessions < 1:
        raise UserError(f"n_sessions: expected a positive integer, got {n_sessions!r}")
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir}: NSD raw directory not found")

    # 1. check every input before any heavy work
    design = load_design(raw_dir / EXPDESIGN)
    present = subjects_present(raw_dir)
    if s not in present or s > design["subjectim"].shape[0]:
        listed = ", ".join(str(p) for p in present) or "none"
        raise UserError(f"NSD subject {s} not found under {raw_dir} (no {BETAS_DIR.format(s=s)} or ROI); "
                        f"subjects present: {listed}")
    session_paths = [raw_dir / BETAS.format(s=s, n=n) for n in range(1, n_sessions + 1)]
    missing = [p for p in session_paths if not p.is_file()]
    if missing:
        have = len(session_paths) - len(missing)
        raise UserError(f"{missing[0]}: betas file not found ({have} of the {n_sessions} requested sessions exist)")
    stim_path = raw_dir / STIMULI
    if not stim_path.is_file():
        raise UserError(f"{stim_path}: NSD stimulus file not found")
    caption_path = Path(captions) if captions not in (None, "") else None
    if caption_path is not None and not caption_path.is_file():
        raise UserError(f"{caption_path}: caption file not found")
    roi_path = raw_dir / ROI.format(s=s)
    mask = load_roi(roi_path)
    n_voxels = int(mask.sum())

    # 2. trial bookkeeping: split + row of every trial, images in order of first appearance
    counts = session_trial_counts(session_paths, mask.shape)
    n_trials = int(sum(counts))
    master = design["masterordering"]
    if n_trials > len(master):
        raise UserError(f"{raw_dir / EXPDESIGN}: masterordering has {len(master)} trials, "
                        f"the betas of {n_sessions} sessions {n_trials}")
    plan = assign_trials(master, design["subjectim"][s - 1], n_trials, design["n_shared"])
    ids = {"train": plan["train"], "test": plan["test"]}
    if not len(ids["train"]) or not len(ids["test"]):
        raise UserError(f"NSD subject {s}: {n_sessions} sessions give {len(ids['train'])} train and "
                        f"{len(ids['test'])} test images; both must be non-empty")

    # 3. fMRI: one session at a time, folded into per-image sums and counts
    sums = {k: np.zeros((len(v), n_voxels), dtype=np.float64) for k, v in ids.items()}
    nrep = {k: np.zeros(len(v), dtype=np.int64) for k, v in ids.items()}
    start = 0
    sessions = list(zip(session_paths, counts))
    for path, count in tqdm(sessions, desc=f"subj{s:02d} sessions", unit="session", disable=not progress):
        betas = masked_session(path, mask)  # (count, V)
        for t in range(count):
            name = "train" if plan["split"][start + t] == 0 else "test"
            row = plan["row"][start + t]
            sums[name][row] += betas[t]
            nrep[name][row] += 1
        start += count
        del betas
    fmri = {}
    for k in ids:  # divide in place, then cast: no float64 temporary beside the sums
        sums[k] /= nrep[k][:, None]
        fmri[k] = sums[k].astype(np.float32)
        del sums[k]
    del sums

    # 4. captions
    if caption_path is None:
        caps, caption_sources = _coco_captions(raw_dir, ids)
        caption_source = "coco_json"
    else:
        caps, caption_sources = _curated_captions(caption_path, ids), [caption_path]
        caption_source = "curated_npy"

    # 5. write: images first (largest), manifest last (marks the folder complete)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_size = None
    for name in ("train", "test"):
        stim_out = cf.part_path(out_dir, name, "stim", label)
        image_size = write_stimuli(stim_path, ids[name], stim_out, progress, f"subj{s:02d} {name}")
        cf.write_split(out_dir, name, label, cf.SplitData(
            fmri=fmri[name], cap=cf.captions_array(caps[name]), ids=ids[name], nrep=nrep[name].astype(np.int16),
        ))

    summary = {
        "dataset": "nsd",
        "subject": label,
        "nsd_subject": s,
        "n_train": int(len(ids["train"])),
        "n_test": int(len(ids["test"])),
        "n_voxels": n_voxels,
        "n_sessions": int(n_sessions),
        "n_trials": n_trials,
        "n_train_trials": int(nrep["train"].sum()),
        "n_test_trials": int(nrep["test"].sum()),
        "image_size": list(image_size),
        "roi": ROI_NAME,
        "split_rule": f"masterordering > {design['n_shared']} -> train, else test; rows in order of first appearance",
        "fmri_units": "file units (int16 = percent signal change x 300), mean over repetitions",
        "captions": caption_source,
    }
    sources = [raw_dir / EXPDESIGN, roi_path, *session_paths, stim_path, *caption_sources]
    cf.write_manifest(out_dir, **summary, raw_dir=str(raw_dir), sources=[str(p) for p in sources])
    return summary


# ---------------------------------------------------------------------------------------------
# the pipeline's hooks (pipeline.config.DATASETS): options from the [nsd] config section


def prepare_from_config(cfg, out_dir: Path, subject: str, progress: bool = True) -> dict:
    s = cfg.nsd
    return prepare_subject(cfg.resolve_path(s.raw_dir), out_dir, subject, n_sessions=s.n_sessions,
                           captions=cfg.optional_path(s.captions), progress=progress)


def subject_table(cfg) -> str:
    found = subjects_present(cfg.resolve_path(cfg.nsd.raw_dir))
    return "subjects with betas and an nsdgeneral ROI: " + (", ".join(map(str, found)) or "none")
