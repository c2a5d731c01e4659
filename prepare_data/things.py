"""THINGS-fMRI1 single-trial responses → common format (datasets.md §3).

Two sources are read, with identical results:

* ``'tsv'`` — the authors' *table format* (figshare+ ``betas_csv/``; the metadata files are in fact
  comma-separated): ``sub-XX_ResponseData.h5`` (pandas fixed-format HDF5, key ``ResponseData``,
  rows = voxels, a ``voxel_id`` column and one float column per trial), ``sub-XX_StimulusMetadata.csv``
  (one row per trial: ``trial_type`` train/test, ``session``, ``run``, ``trial_id``, ``stimulus``…)
  and ``sub-XX_VoxelMetadata.csv`` (one row per voxel: coordinates, noise ceilings, 0/1 ROI columns).
  The response file is read with h5py, ROI rows only, in chunks — never with ``pd.read_hdf``, because
  pandas pickles the column labels of this file and we never unpickle. Its trial columns are therefore
  taken in stored order (trial 0, 1, …), as the authors wrote them, unless the labels are stored as
  plain numbers, in which case they are matched to ``trial_id``.
* ``'bdata'`` — the Kamitani lab's BData conversion (datasets.md §3.8): ``sub-XX_training.h5`` +
  ``sub-XX_test.h5`` (used when both exist), or one ``sub-XX.h5`` split by its ``trial_type`` vmap.
  ROI keys are the VoxelMetadata column names; images are named by the ``stimulus_name`` vmap.

``'auto'`` uses the table format when its three files exist, else the BData files. Files are looked
for in ``raw_dir``, ``raw_dir/betas_csv`` and ``raw_dir/bdata``.

Selection and averaging:

* voxels = union of the ROI columns (value 1), in voxel order. The default
  :data:`DEFAULT_ROIS` are the 28 retinotopic and category-selective visual ROIs (all ROI dummies
  except the large ``IT`` mask), i.e. the precursor's set plus ``LO1 (prf)``/``LO2 (prf)``, which it
  meant to include but could not select unquoted. With the default list, ROIs a subject lacks
  (sub-03 has no usable STS) are left out with a warning; an explicitly given ROI that is missing
  is an error listing the columns present.
* ``test`` = trials with ``trial_type == 'test'`` (100 images × 12 sessions), averaged per image;
  ``train`` = ``trial_type == 'train'`` (8640 images shown once; ``nrep`` = 1). Catch trials are not in
  the table files; any other trial type found is dropped with a warning. Images are ordered by first
  appearance in trial order; ids are the stimulus file names without extension (``dog_12s``).
* images: ``<stimulus>`` anywhere below ``image_dir`` (default ``raw_dir/images``; THINGS keeps
  ``object_images/<concept>/<file>``); THINGS images differ in size, so by default each is
  centre-cropped to a square and resized to ``image_size`` = 500 (the precursor's size).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from pipeline import common_format as cf
from pipeline.errors import UserError
from prepare_data.captions_table import load_captions_table, lookup_captions
from prepare_data.deeprecon import (
    ImageIndex,
    average_by_label,
    image_shape,
    load_bdata,
    roi_list,
    roi_mask,
    voxel_columns,
    write_splits,
)

logger = logging.getLogger(__name__)

DATASET = "things"
ROI_COLUMNS = (
    "V1", "V2", "V3", "hV4", "VO1", "VO2", "LO1 (prf)", "LO2 (prf)", "TO1", "TO2", "V3b", "V3a",
    "lEBA", "rEBA", "lFFA", "rFFA", "lOFA", "rOFA", "lSTS", "rSTS", "lPPA", "rPPA", "lRSC", "rRSC",
    "lTOS", "rTOS", "lLOC", "rLOC", "IT",
)  # every ROI dummy column of VoxelMetadata (datasets.md §3.5), besides the glasser-* parcels
DEFAULT_ROIS = tuple(r for r in ROI_COLUMNS if r != "IT")
DEFAULT_IMAGE_SIZE = 500
SOURCES = ("auto", "tsv", "bdata")
SEARCH_DIRS = (".", "betas_csv", "bdata")
TABLE_FILES = {"responses": "{s}_ResponseData.h5", "stimuli": "{s}_StimulusMetadata.csv", "voxels": "{s}_VoxelMetadata.csv"}
BDATA_SPLIT_FILES = {"train": "{s}_training.h5", "test": "{s}_test.h5"}
BDATA_SINGLE_FILE = "{s}.h5"
TRIAL_TYPES = ("train", "test")
ROW_CHUNK = 2048  # voxel rows per HDF5 read


def subject_name(subject: int | str) -> str:
    """1, '1', '01', 'sub01' or 'sub-01' → 'sub-01'."""
    text = str(subject).strip().lower()
    for prefix in ("sub-", "sub_", "sub"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if not text.isdigit():
        raise UserError(f"THINGS subject {subject!r}: expected a number such as 1, '01' or 'sub-01'")
    return f"sub-{int(text):02d}"


def _find(raw_dir: Path, name: str) -> Path | None:
    for sub in SEARCH_DIRS:
        p = raw_dir / sub / name
        if p.is_file():
            return p
    return None


def find_sources(raw_dir: str | os.PathLike, subject: int | str) -> dict[str, dict[str, Path]]:
    """Complete file sets for one subject: ``{'tsv': {...}, 'bdata': {...}}`` (absent keys: incomplete)."""
    raw_dir, s = Path(raw_dir), subject_name(subject)
    found: dict[str, dict[str, Path]] = {}
    table = {k: _find(raw_dir, v.format(s=s)) for k, v in TABLE_FILES.items()}
    if all(table.values()):
        found["tsv"] = table
    split = {k: _find(raw_dir, v.format(s=s)) for k, v in BDATA_SPLIT_FILES.items()}
    if all(split.values()):
        found["bdata"] = split
    else:
        single = _find(raw_dir, BDATA_SINGLE_FILE.format(s=s))
        if single:
            found["bdata"] = {"all": single}
    return found


def list_subjects(raw_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{'01': ['tsv', 'bdata'], ...}``: subjects with a complete file set, and which sources."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir}: raw THINGS folder not found")
    numbers = set()
    for sub in SEARCH_DIRS:
        for p in (raw_dir / sub).glob("sub-*"):
            head = p.name[4:].split("_")[0].split(".")[0]
            if head.isdigit():
                numbers.add(head)
    out = {}
    for n in sorted(numbers, key=int):
        sources = find_sources(raw_dir, n)
        if sources:
            out[n] = [k for k in ("tsv", "bdata") if k in sources]
    return out


def format_subject_table(found: Mapping[str, Sequence[str]]) -> str:
    """Printable table of :func:`list_subjects`."""
    if not found:
        return "no subject files found"
    lines = ["subject  tsv  bdata"]
    for n, srcs in found.items():
        lines.append(f"{n:<7}  {'yes' if 'tsv' in srcs else '-':<3}  {'yes' if 'bdata' in srcs else '-'}")
    return "\n".join(lines)


def _stem(name: str) -> str:
    """Stimulus file name → image id: ``dog/dog_12s.jpg`` → ``dog_12s``."""
    return os.path.splitext(os.path.basename(str(name)))[0]


# --------------------------------------------------------------------------------------------
# Table format
# --------------------------------------------------------------------------------------------

def _roi_union(columns: Sequence[str], rois: Sequence[str] | None, path: Path) -> list[str]:
    """The ROI columns to use: explicit lists must exist; the default list skips absent ones."""
    names = list(DEFAULT_ROIS if rois is None else rois)
    if not names:
        raise UserError("rois: empty ROI list")
    present = set(columns)
    absent = [r for r in names if r not in present]
    roi_like = [c for c in columns if c in ROI_COLUMNS or str(c).startswith("glasser-")]
    if absent and (rois is not None or len(absent) == len(names)):
        raise UserError(
            f"{path}: ROI column(s) {absent} not found; ROI columns present: {roi_like or list(columns)}"
        )
    if absent:
        logger.warning("%s: default ROI columns %s not found; left out", path, absent)
    return [r for r in names if r in present]


def _read_csv(path: Path, **kw):
    import pandas as pd

    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read CSV ({exc})") from None


def read_voxel_mask(path: Path, rois: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """VoxelMetadata → boolean mask over voxel rows (union of ROI columns == 1) and ROIs used."""
    header = _read_csv(path, nrows=0)
    used = _roi_union(list(header.columns), rois, path)
    table = _read_csv(path, usecols=used)
    values = table[used].to_numpy(dtype=np.float64)
    mask = (values == 1).any(axis=1)
    if not mask.any():
        raise UserError(f"{path}: ROI columns {used} select no voxels")
    return mask, used


def read_stimulus_table(path: Path):
    """StimulusMetadata → DataFrame with at least ``trial_type`` and ``stimulus`` (one row per trial)."""
    table = _read_csv(path, dtype={"stimulus": str, "trial_type": str})
    need = [c for c in ("trial_type", "stimulus") if c not in table.columns]
    if need:
        raise UserError(f"{path}: missing column(s) {need}; columns present: {list(table.columns)}")
    if "trial_id" in table.columns:
        ids = table["trial_id"].to_numpy()
        if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or len(set(ids.tolist())) != len(ids):
            raise UserError(f"{path}: column 'trial_id' must hold distinct non-negative integers")
    return table


def _plain_labels(ds) -> list | None:
    """Column labels stored as numbers or byte strings; None when pandas pickled them."""
    if ds.dtype.kind in "iu":
        return [int(x) for x in ds[()]]
    if ds.dtype.kind in "SU":
        return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]
    return None


def _response_layout(h5, path: Path) -> dict:
    """Locate the trial block of a pandas fixed-format frame: values dataset and its column labels."""
    groups = [k for k in h5.keys()]
    key = "ResponseData" if "ResponseData" in h5 else (groups[0] if len(groups) == 1 else None)
    if key is None:
        raise UserError(f"{path}: no 'ResponseData' group; groups present: {groups}")
    g = h5[key]
    if "table" in g:
        raise UserError(f"{path}: ResponseData is in pandas 'table' format; expected the authors' fixed format")
    nblocks = int(g.attrs.get("nblocks", 0))
    blocks = []
    for i in range(nblocks):
        values, items = g.get(f"block{i}_values"), g.get(f"block{i}_items")
        if values is None or items is None:
            continue
        blocks.append((values, _plain_labels(items)))
    floats = [(v, lab) for v, lab in blocks if v.dtype.kind == "f" and v.ndim == 2]
    if not floats:
        raise UserError(f"{path}: no float block in ResponseData; not a THINGS single-trial response file")
    values, labels = max(floats, key=lambda b: b[0].shape[1])
    voxel_id = None
    for v, lab in blocks:
        if lab is not None and "voxel_id" in lab and v.ndim == 2:
            voxel_id = np.asarray(v[:, lab.index("voxel_id")])
    return {"values": values, "labels": labels, "voxel_id": voxel_id}


def read_table_source(files: Mapping[str, Path], rois: Sequence[str] | None, progress: bool) -> dict:
    """Table files → ``{'values' (n_trial, n_roi_voxel), 'trial_type', 'names', 'roi', 'n_voxel_total'}``."""
    import h5py

    stim = read_stimulus_table(files["stimuli"])
    mask, used = read_voxel_mask(files["voxels"], rois)
    try:
        h5 = h5py.File(files["responses"], "r")
    except OSError as exc:
        raise UserError(f"{files['responses']}: cannot open as HDF5 ({exc})") from None
    with h5:
        layout = _response_layout(h5, files["responses"])
        ds = layout["values"]
        n_vox, n_col = ds.shape
        if n_vox != mask.size:
            raise UserError(
                f"{files['voxels']}: has {mask.size} voxel rows but {files['responses']} has {n_vox}; "
                f"they must come from the same subject"
            )
        if layout["voxel_id"] is not None and not np.array_equal(layout["voxel_id"], np.arange(n_vox)):
            raise UserError(f"{files['responses']}: voxel_id is not 0..{n_vox - 1} in row order")
        trial_ids = stim["trial_id"].to_numpy() if "trial_id" in stim.columns else np.arange(len(stim))
        if layout["labels"] is not None:
            pos = {lab: j for j, lab in enumerate(layout["labels"])}
            lookup = [pos.get(int(t), pos.get(str(int(t)))) for t in trial_ids]
            if any(p is None for p in lookup):
                bad = next(int(t) for t, p in zip(trial_ids, lookup) if p is None)
                raise UserError(f"{files['responses']}: no column for trial_id {bad} of {files['stimuli']}")
            cols = np.array(lookup)
        else:
            if n_col != len(stim):
                raise UserError(
                    f"{files['responses']}: {n_col} trial columns but {files['stimuli']} lists {len(stim)} trials"
                )
            if trial_ids.max(initial=-1) >= n_col:
                raise UserError(f"{files['stimuli']}: trial_id {int(trial_ids.max())} beyond the {n_col} response columns")
            cols = trial_ids
        rows = []
        starts = range(0, n_vox, ROW_CHUNK)
        for start in tqdm(starts, desc="ResponseData rows", disable=not progress):
            keep = mask[start:start + ROW_CHUNK]
            if keep.any():
                rows.append(np.asarray(ds[start:start + ROW_CHUNK], dtype=np.float64)[keep])
        values = np.concatenate(rows, axis=0)
        if not np.array_equal(cols, np.arange(n_col)):
            values = values[:, cols]
        values = values.T  # (n_trial, n_roi_voxel)
    return {
        "values": values,
        "trial_type": stim["trial_type"].astype(str).str.strip().tolist(),
        "names": stim["stimulus"].astype(str).tolist(),
        "roi": used,
        "n_voxel_total": int(n_vox),
        "sources": [str(p) for p in files.values()],
    }


# --------------------------------------------------------------------------------------------
# BData conversion
# --------------------------------------------------------------------------------------------

def _bdata_rois(bdata, rois, path, vox_cols):
    names = list(DEFAULT_ROIS if rois is None else rois)
    return roi_mask(bdata, names, path, vox_cols, missing="skip" if rois is None else "error")


def _bdata_labels(bdata, key: str, path: Path) -> list[str] | None:
    if key not in bdata.metadata.key:
        return None
    if key not in bdata.get_vmap_keys():
        raise UserError(f"{path}: key {key!r} has no vmap, so its codes cannot be named")
    return [str(x) for x in bdata.get_labels(key)]


def read_bdata_source(files: Mapping[str, Path], rois: Sequence[str] | None) -> dict:
    """BData file(s) → the same dict as :func:`read_table_source`."""
    values, types, names, used, ref = [], [], [], None, None
    for split, path in files.items():
        bdata = load_bdata(path)
        vox_cols = voxel_columns(bdata, path)
        mask, used_here = _bdata_rois(bdata, rois, path, vox_cols)
        stim = _bdata_labels(bdata, "stimulus_name", path)
        if stim is None:
            raise UserError(f"{path}: no 'stimulus_name' key; expected the Kamitani-lab THINGS BData conversion")
        ttype = _bdata_labels(bdata, "trial_type", path)
        if ttype is None:
            if split == "all":
                raise UserError(f"{path}: no 'trial_type' key, so train and test trials cannot be told apart")
            ttype = [split] * len(stim)
        voxel_id = bdata.get_metadata("voxel_id")[vox_cols][mask] if "voxel_id" in bdata.metadata.key else None
        if ref is None:
            ref = (path, int(mask.sum()), voxel_id, used_here)
        elif int(mask.sum()) != ref[1] or (voxel_id is not None and ref[2] is not None
                                            and not np.array_equal(voxel_id, ref[2])):
            raise UserError(f"{path}: selects different voxels than {ref[0]}; both files must share one voxel set")
        used = used_here
        values.append(np.asarray(bdata.dataset[:, vox_cols[mask]], dtype=np.float64))
        types += ttype
        names += stim
    return {
        "values": np.concatenate(values, axis=0),
        "trial_type": types,
        "names": names,
        "roi": used,
        "n_voxel_total": int(vox_cols.size),
        "sources": [str(p) for p in files.values()],
    }


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def split_trials(values: np.ndarray, trial_type: Sequence[str], names: Sequence[str]) -> dict:
    """Per split, ``(ids, means float64 (n_img, n_voxel), nrep)``; images in first-appearance order.

    values: (n_trial, n_voxel). Trial types other than train/test are dropped with a warning.
    """
    types = np.array([str(t) for t in trial_type])
    other = sorted(set(types.tolist()) - set(TRIAL_TYPES))
    if other:
        logger.warning("dropping %d trials of type %s (only train/test are used)",
                       int(np.isin(types, other).sum()), other)
    ids = [_stem(n) for n in names]
    out = {}
    for split in TRIAL_TYPES:
        rows = np.flatnonzero(types == split)
        if rows.size == 0:
            raise UserError(f"no {split!r} trials found (trial_type values present: {sorted(set(types.tolist()))})")
        out[split] = average_by_label(values[rows], [ids[i] for i in rows])
    nrep = out["test"][2]
    if nrep.min() != nrep.max():
        logger.warning("test images have between %d and %d repetitions", nrep.min(), nrep.max())
    return out


def prepare_subject(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    subject: int | str,
    *,
    rois: Sequence[str] | None = None,
    image_dir: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    source: str = "auto",
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    progress: bool = True,
) -> dict:
    """Write the common format (``train``, ``test``) for one THINGS-fMRI1 subject into ``out_dir``.

    Args:
        raw_dir: folder with the table files and/or the BData files (also searched: ``betas_csv/``, ``bdata/``).
        out_dir: the subject's common-format folder (``common_format.subject_dir``).
        subject: 1, '01' or 'sub-01' to find the files; used verbatim (``str(subject)``) in output names.
        rois: ROI columns/keys whose union is used (a list, or one string joined by ``+``);
            None = :data:`DEFAULT_ROIS`, of which ROIs a subject lacks are skipped with a warning.
        image_dir: folder searched recursively for the stimulus files; default ``raw_dir/images``.
        captions: optional CSV/TSV captions table; images without captions get ``''`` and a warning.
        source: 'tsv' (table format), 'bdata' (Kamitani conversion) or 'auto' (tsv if complete, else bdata).
        image_size: square output size (centre crop + Lanczos resize); None keeps the files' size,
            which must then agree within a split.
        progress: tqdm bars for the response rows and images.

    Returns a summary: ``subject``, ``source``, ``n_voxel``, ``roi``, ``n_train``, ``n_test``,
    ``splits`` (per split n_img, nrep_min/max, image_shape, captions_missing), ``files``.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if source == "table":
        source = "tsv"
    if source not in SOURCES:
        raise UserError(f"source: {source!r} is not one of {list(SOURCES)}")
    name = subject_name(subject)
    tag = str(subject)
    if rois is not None:
        rois = roi_list(rois)

    # 1. which files
    found = find_sources(raw_dir, subject)
    if source == "auto":
        source = "tsv" if "tsv" in found else "bdata" if "bdata" in found else ""
    if source not in found:
        table = ", ".join(v.format(s=name) for v in TABLE_FILES.values())
        bdata = " + ".join(v.format(s=name) for v in BDATA_SPLIT_FILES.values()) + " or " + BDATA_SINGLE_FILE.format(s=name)
        wanted = {"tsv": table, "bdata": bdata}.get(source, f"{table}; or {bdata}")
        missing = ""
        if source in ("tsv", ""):
            absent = [v.format(s=name) for v in TABLE_FILES.values() if _find(raw_dir, v.format(s=name)) is None]
            missing = f" (missing: {', '.join(absent)})"
        raise UserError(f"{raw_dir}: THINGS files for {name} not found; expected {wanted}{missing}")
    files = found[source]
    image_dir = Path(image_dir) if image_dir is not None else raw_dir / "images"
    images = ImageIndex(image_dir)
    table = load_captions_table(captions) if captions is not None else None

    # 2. responses of the ROI voxels, averaged per image
    logger.info("things %s: reading %s (%s)", name, ", ".join(str(p) for p in files.values()), source)
    if source == "tsv":
        data = read_table_source(files, rois, progress)
    else:
        data = read_bdata_source(files, rois)
    splits = split_trials(data["values"], data["trial_type"], data["names"])

    # 3. images and captions, still writing nothing
    planned, summary_splits = {}, {}
    for split, (ids, means, nrep) in splits.items():
        img_paths = images.find_all(ids, what=f"{split} stimulus")
        shape = image_shape(img_paths, image_size, split)
        caps, no_caps = lookup_captions(table, ids, source=captions or "", what=f"{split} images")
        planned[split] = (
            cf.SplitData(fmri=means.astype(np.float32), cap=cf.captions_array(caps),
                         ids=np.array(ids, dtype=str), nrep=nrep.astype(np.int16)),
            img_paths, shape,
        )
        summary_splits[split] = {"n_img": len(ids), "nrep_min": int(nrep.min()), "nrep_max": int(nrep.max()),
                                 "image_shape": list(shape), "captions_missing": len(no_caps)}

    # 4. write
    written = write_splits(out_dir, tag, planned, image_size, progress)
    summary = {
        "dataset": DATASET,
        "subject": tag,
        "source": source,
        "n_voxel": int(data["values"].shape[1]),
        "roi": " + ".join(data["roi"]),
        "n_train": summary_splits["train"]["n_img"],
        "n_test": summary_splits["test"]["n_img"],
        "splits": summary_splits,
    }
    manifest = cf.write_manifest(
        out_dir, **summary, raw_dir=str(raw_dir), image_dir=str(image_dir), sources=data["sources"],
        captions=str(captions) if captions else None, n_voxel_total=data["n_voxel_total"],
        config={"rois": list(data["roi"]), "image_size": image_size, "source": source,
                "average": "mean of trials per image, first-appearance order; train 1 trial per image"},
    )
    summary["files"] = [str(p) for p in written] + [str(manifest)]
    return summary


# ---------------------------------------------------------------------------------------------
# the pipeline's hooks (pipeline.config.DATASETS): options from the [things] config section


def prepare_from_config(cfg, out_dir: Path, subject: str, progress: bool = True) -> dict:
    s = cfg.things
    opts = dict(image_dir=cfg.optional_path(s.image_dir), captions=cfg.optional_path(s.captions), source=s.source,
                image_size=s.image_size, progress=progress)
    if s.rois:
        opts["rois"] = list(s.rois)
    return prepare_subject(cfg.resolve_path(s.raw_dir), out_dir, subject, **opts)


def subject_table(cfg) -> str:
    return format_subject_table(list_subjects(cfg.resolve_path(cfg.things.raw_dir)))
