"""Deeprecon (Kamitani lab, Shen et al. 2019) BData files → common format (datasets.md §2).

One BData HDF5 file per subject and session, found with ``file_pattern`` (default
``{subject}_{session}_volume_native.h5``, the lab-internal spelling; the public figshare files are
``{subject}_{session}_fmriprep_volume_native.h5``). Each row of a file is one stimulus block.
Sessions map to splits: ``train`` = ImageNetTraining (1200 images × 5), ``test`` = ImageNetTest
(50 × 24), ``art`` = ArtificialShapes (40 × 20).

What :func:`prepare_subject` does, per split:

1. read the file with bdpy; keep the ``VoxelData`` columns flagged 1 by the ROI key(s)
   (default ``ROI_VC`` = LVC + hV4 + HVC), in file column order;
2. name every row by ``label_key`` (default ``stimulus_name``, decoded through the file's vmap;
   files without a vmap but with the float ``stimulus_id`` encoding, e.g. ``1518878.005958`` →
   ``n01518878_5958``, are decoded too); rows labelled ``n/a`` (NaN code) are dropped with a warning;
3. average the rows of each image; images are ordered by **first appearance** in the file, and
   ``nrep`` records how many rows were averaged (not assumed to be 5/24/20);
4. find ``<label>.<ext>`` anywhere below ``image_dir`` (extensions :data:`IMAGE_EXTENSIONS`);
5. captions from the user's table (:mod:`prepare_data.captions_table`), ``''`` where absent.

Images: ``image_size=None`` keeps the files' own size (the lab's copy: 500×500 natural images,
240×240 shape TIFFs) and then requires every image of a split to have the same size;
``image_size=N`` centre-crops each image to a square and resizes it to N×N (Lanczos).
Grey, palette and RGBA images become RGB.

Nothing is written until every file, key, label and image of every split has been checked; each
output file then appears atomically (stimuli are streamed into memory-mapped temporaries and
renamed at the end).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import string
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from pipeline import common_format as cf
from pipeline import io
from pipeline.errors import UserError
from prepare_data.captions_table import load_captions_table, lookup_captions

logger = logging.getLogger(__name__)

DATASET = "deeprecon"
DEFAULT_FILE_PATTERN = "{subject}_{session}_volume_native.h5"
DEFAULT_SESSIONS = {"train": "ImageNetTraining", "test": "ImageNetTest", "art": "ArtificialShapes"}
DEFAULT_ROI = "ROI_VC"  # the lab's visual-cortex key (datasets.md §2.4); ROI_VC = LVC + hV4 + HVC
DEFAULT_LABEL_KEY = "stimulus_name"
VOXEL_KEY = "VoxelData"
COORD_KEYS = ("voxel_x", "voxel_y", "voxel_z")
# Preference order when one image name exists with several extensions.
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG", ".tiff", ".tif", ".TIFF", ".TIF")
_IMAGE_EXT_LOWER = tuple(dict.fromkeys(e.lower() for e in IMAGE_EXTENSIONS))
MAX_LISTED = 40  # keys/labels listed in one error message


# --------------------------------------------------------------------------------------------
# Images (shared with prepare_data.things)
# --------------------------------------------------------------------------------------------

class ImageIndex:
    """Every image file below a folder, found by file name or by name without extension.

    Folders are searched recursively, so flat folders and per-split or per-concept sub-folders
    (THINGS' ``object_images/<concept>/<file>``) both work.
    """

    def __init__(self, image_dir: str | os.PathLike):
        self.root = Path(image_dir)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: image folder not found (set image_dir)")
        self._by_name: dict[str, list[Path]] = {}
        self._by_stem: dict[str, list[Path]] = {}
        for folder, _, files in os.walk(self.root, followlinks=True):
            for fname in files:
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in _IMAGE_EXT_LOWER or fname.startswith("."):
                    continue
                path = Path(folder) / fname
                self._by_name.setdefault(fname, []).append(path)
                self._by_stem.setdefault(stem, []).append(path)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def find(self, name: str) -> Path | None:
        """The file for ``name`` (``n01518878_5958`` or ``dog_12s.jpg``); None if there is none.

        With several candidates, the extension earliest in :data:`IMAGE_EXTENSIONS` wins; two
        files with the same name in different folders are ambiguous and raise UserError.
        """
        exact = self._by_name.get(name)
        candidates = exact if exact else self._by_stem.get(name)
        if not candidates and os.path.splitext(name)[1].lower() in _IMAGE_EXT_LOWER:
            candidates = self._by_stem.get(os.path.splitext(name)[0])
        if not candidates:
            return None

        def rank(p: Path) -> int:
            ext = p.suffix
            if ext in IMAGE_EXTENSIONS:
                return IMAGE_EXTENSIONS.index(ext)
            return len(IMAGE_EXTENSIONS) + _IMAGE_EXT_LOWER.index(ext.lower())

        best = min(rank(p) for p in candidates)
        top = sorted(p for p in candidates if rank(p) == best)
        if len(top) > 1:
            raise UserError(f"{self.root}: image {name!r} is ambiguous: {top[0]} and {top[1]}; keep one of them")
        return top[0]

    def find_all(self, names: Sequence[str], what: str = "label") -> list[Path]:
        """Files for every name, in order; UserError naming the missing ones and the folder."""
        paths, missing = [], []
        for n in names:
            p = self.find(n)
            (missing.append(n) if p is None else paths.append(p))
        if missing:
            exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            raise UserError(
                f"{self.root}: no image file for {len(missing)} {what}(s), e.g. {missing[0]!r} "
                f"(looked for <name>.{{{exts}}} in all sub-folders): {', '.join(missing[:10])}"
            )
        return paths


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None
    return img


def image_shape(paths: Sequence[Path], image_size: int | None, split: str) -> tuple[int, int]:
    """(H, W) of the split's stimulus array; with ``image_size=None`` all files must agree.

    Only file headers are read here, so this is cheap and runs before anything is written.
    """
    from PIL import Image, UnidentifiedImageError

    if image_size is not None:
        if int(image_size) < 1:
            raise UserError(f"image_size must be a positive number of pixels or None, got {image_size!r}")
        return int(image_size), int(image_size)
    first_size, first_path = None, None
    for p in paths:
        try:
            with Image.open(p) as img:
                size = img.size  # (W, H)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{p}: cannot read image ({exc})") from None
        if first_size is None:
            first_size, first_path = size, p
        elif size != first_size:
            raise UserError(
                f"{split} split: images differ in size ({first_path}: {first_size[0]}x{first_size[1]}, "
                f"{p}: {size[0]}x{size[1]}); set image_size to resize them all to one square size"
            )
    if first_size is None:
        raise UserError(f"{split} split: no images")
    return first_size[1], first_size[0]


def load_image(path: str | os.PathLike, image_size: int | None = None) -> np.ndarray:
    """Image as uint8 (H, W, 3) RGB; with ``image_size``, centre-cropped square and resized (Lanczos)."""
    from PIL import Image

    img = _open_image(Path(path))
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    if image_size is not None:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != image_size:
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def write_splits(
    out_dir: str | os.PathLike,
    tag: str,
    splits: Mapping[str, tuple[cf.SplitData, Sequence[Path], tuple[int, int]]],
    image_size: int | None,
    progress: bool = True,
) -> list[Path]:
    """Write validated splits: ``{split: (data without stim, image paths, (H, W))}``.

    Every split's stimuli are decoded into memory-mapped temporaries first; the other arrays
    are written once all images were read, and the stimulus files are renamed into place last,
    so a bad image leaves no output behind.
    """
    for split, (data, paths, _) in splits.items():
        if len(paths) != len(data):
            raise ValueError(f"{split}: {len(paths)} images for {len(data)} rows")
        cf.validate_split(data, Path(out_dir) / f"{split} split")
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        for split, (data, paths, (h, w)) in splits.items():
            target = cf.part_path(out_dir, split, "stim", tag)
            stim = stack.enter_context(io.atomic_memmap(target, (len(paths), h, w, 3), np.uint8))
            for i, p in enumerate(tqdm(paths, desc=f"{split} images", disable=not progress)):
                arr = load_image(p, image_size)
                if arr.shape != (h, w, 3):
                    raise UserError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}, other {split} images are {w}x{h}")
                stim[i] = arr
            written.append(target)
        for split, (data, _, _) in splits.items():
            written.extend(cf.write_split(out_dir, split, tag, data))
    return written


# --------------------------------------------------------------------------------------------
# BData files
# --------------------------------------------------------------------------------------------

def _listing(items: Iterable[str]) -> str:
    items = list(items)
    more = f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(repr(k) for k in items[:MAX_LISTED]) + more


def load_bdata(path: str | os.PathLike):
    """Open a BData file with bdpy; UserError for a missing or unreadable file."""
    import bdpy

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: BData file not found")
    try:
        return bdpy.BData(str(path))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as a BData HDF5 file ({exc})") from None


def voxel_columns(bdata, path: str | os.PathLike) -> np.ndarray:
    """Indices of the ``VoxelData`` columns of the dataset."""
    if VOXEL_KEY not in bdata.metadata.key:
        raise UserError(f"{path}: no {VOXEL_KEY!r} metadata key; this is not a BData fMRI file")
    cols = np.flatnonzero(bdata.get_metadata(VOXEL_KEY) == 1)
    if cols.size == 0:
        raise UserError(f"{path}: {VOXEL_KEY!r} marks no columns")
    return cols


def roi_keys(bdata, vox_cols: np.ndarray) -> list[str]:
    """Metadata keys that look like ROI flags: 0/1 on every voxel column, set on some."""
    keys = []
    for key in bdata.metadata.key:
        if key == VOXEL_KEY:
            continue
        v = bdata.get_metadata(key)[vox_cols]
        if np.all((v == 0) | (v == 1)) and v.any():
            keys.append(key)
    return keys


def roi_list(rois: str | Sequence[str]) -> list[str]:
    """``'ROI_V1 + ROI_V2'`` or ``['ROI_V1', 'ROI_V2']`` → ``['ROI_V1', 'ROI_V2']`` (a union)."""
    if isinstance(rois, str):
        return [r.strip() for r in rois.split("+") if r.strip()]
    return [str(r) for r in rois]


def roi_mask(bdata, rois: str | Sequence[str], path: str | os.PathLike, vox_cols: np.ndarray | None = None,
             missing: str = "error") -> tuple[np.ndarray, list[str]]:
    """Boolean mask over the voxel columns: union of the ROI keys (value 1), and the keys used.

    ``missing='error'`` raises UserError listing the ROI keys present when a key is absent;
    ``missing='skip'`` leaves it out with a warning (used for default ROI lists).
    """
    if vox_cols is None:
        vox_cols = voxel_columns(bdata, path)
    names = roi_list(rois)
    if not names:
        raise UserError(f"{path}: empty ROI list")
    keys = set(bdata.metadata.key)
    absent = [r for r in names if r not in keys]
    if absent and (missing == "error" or len(absent) == len(names)):
        raise UserError(
            f"{path}: ROI key(s) {_listing(absent)} not found; ROI keys present: {_listing(roi_keys(bdata, vox_cols))}"
        )
    if absent:
        logger.warning("%s: ROI keys %s not found, left out of the default ROI set", path, _listing(absent))
    used = [r for r in names if r in keys]
    mask = np.zeros(vox_cols.size, dtype=bool)
    for r in used:
        mask |= bdata.get_metadata(r)[vox_cols] == 1
    if not mask.any():
        raise UserError(f"{path}: ROI {_listing(used)} selects no voxels")
    return mask, used


def _sample_keys(bdata) -> list[str]:
    """Keys marking exactly one column (per-sample labels such as Run, Block, stimulus_name)."""
    out = []
    for key in bdata.metadata.key:
        v = bdata.get_metadata(key)
        if np.count_nonzero(v == 1) == 1 and np.count_nonzero(~np.isnan(v)) == 1:
            out.append(key)
    return out


def decode_stimulus_id(value: float) -> str:
    """Kamitani float image code → ImageNet name: ``1518878.005958`` → ``n01518878_5958``."""
    whole, frac = f"{value:.6f}".split(".")
    return f"n{int(whole):08d}_{int(frac)}"


def sample_labels(bdata, label_key: str, path: str | os.PathLike) -> list[str]:
    """One image name per row ('n/a' for NaN codes), via the vmap or the stimulus_id encoding."""
    if label_key not in bdata.metadata.key:
        raise UserError(f"{path}: label key {label_key!r} not found; per-sample keys present: {_listing(_sample_keys(bdata))}")
    if label_key in bdata.get_vmap_keys():
        return [str(x) for x in bdata.get_labels(label_key)]
    codes = bdata.get(label_key)
    if codes.ndim != 2 or codes.shape[1] != 1:
        raise UserError(f"{path}: label key {label_key!r} spans {codes.shape[1]} columns; expected one column")
    codes = codes[:, 0]
    valid = codes[~np.isnan(codes)]
    if valid.size and np.all(valid == np.round(valid)):
        raise UserError(
            f"{path}: label key {label_key!r} has integer codes but no vmap to turn them into image names; "
            f"use a key with a vmap (e.g. 'stimulus_name') or the float 'stimulus_id' encoding"
        )
    return ["n/a" if np.isnan(c) else decode_stimulus_id(float(c)) for c in codes]


def average_by_label(values: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean of the rows of each label, labels in order of first appearance.

    values: (n_rows, n_voxel). Returns ids (n_img,), means float64 (n_img, n_voxel), nrep int (n_img,).
    """
    order: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        order.setdefault(lab, []).append(i)
    ids = list(order)
    means = np.empty((len(ids), values.shape[1]), dtype=np.float64)
    for j, lab in enumerate(ids):
        means[j] = values[order[lab]].mean(axis=0, dtype=np.float64)
    nrep = np.array([len(order[lab]) for lab in ids], dtype=np.int64)
    return ids, means, nrep


def read_session(path: str | os.PathLike, roi: str | Sequence[str], label_key: str = DEFAULT_LABEL_KEY) -> dict:
    """One session file → ROI voxels and labels.

    Returns ``{'path', 'voxels': float64 (n_rows, n_roi_voxel), 'labels': list[str] (n_rows,),
    'coords': (n_roi_voxel, 3) or None, 'roi': keys used, 'n_dropped': rows labelled 'n/a'}``.
    """
    path = Path(path)
    bdata = load_bdata(path)
    vox_cols = voxel_columns(bdata, path)
    mask, used = roi_mask(bdata, roi, path, vox_cols)
    labels = sample_labels(bdata, label_key, path)
    cols = vox_cols[mask]
    voxels = np.asarray(bdata.dataset[:, cols], dtype=np.float64)
    keep = np.array([lab != "n/a" for lab in labels], dtype=bool)
    n_dropped = int((~keep).sum())
    if n_dropped:
        logger.warning("%s: %d rows have no %s label ('n/a') and are left out", path, n_dropped, label_key)
    if not keep.any():
        raise UserError(f"{path}: no row has a {label_key!r} label")
    coords = None
    if all(k in bdata.metadata.key for k in COORD_KEYS):
        coords = np.stack([bdata.get_metadata(k)[cols] for k in COORD_KEYS], axis=1)
    return {
        "path": path,
        "voxels": voxels[keep],
        "labels": [lab for lab, k in zip(labels, keep) if k],
        "coords": coords,
        "roi": used,
        "n_dropped": n_dropped,
    }


# --------------------------------------------------------------------------------------------
# Subjects and sessions
# --------------------------------------------------------------------------------------------

def _check_sessions(sessions: Mapping[str, str]) -> dict[str, str]:
    sessions = dict(sessions)
    if not sessions:
        raise UserError("sessions: no sessions given (expected e.g. {'train': 'ImageNetTraining', 'test': 'ImageNetTest'})")
    bad = [s for s in sessions if s not in cf.SPLITS]
    if bad:
        raise UserError(f"sessions: unknown split name(s) {bad}; expected some of {list(cf.SPLITS)}")
    return sessions


def _check_pattern(file_pattern: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(file_pattern) if f is not None}
    if fields != {"subject", "session"}:
        raise UserError(f"file_pattern {file_pattern!r}: must contain exactly the fields {{subject}} and {{session}}")


def session_path(raw_dir: str | os.PathLike, file_pattern: str, subject: str, session: str) -> Path:
    """``raw_dir / file_pattern.format(subject=..., session=...)``."""
    return Path(raw_dir) / file_pattern.format(subject=subject, session=session)


def list_subjects(
    raw_dir: str | os.PathLike,
    file_pattern: str = DEFAULT_FILE_PATTERN,
    sessions: Mapping[str, str] = DEFAULT_SESSIONS,
) -> dict[str, list[str]]:
    """``{subject: [session names present]}`` for every file under ``raw_dir`` matching the pattern.

    Sessions are listed in the order of ``sessions``; subjects are sorted.
    """
    _check_pattern(file_pattern)
    sessions = _check_sessions(sessions)
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir}: raw Deeprecon folder not found")
    found: dict[str, set[str]] = {}
    for session in sessions.values():
        regex = ""
        for literal, field, _, _ in string.Formatter().parse(file_pattern):
            regex += re.escape(literal)
            if field == "subject":
                regex += r"(?P<subject>[^/]+?)"
            elif field == "session":
                regex += re.escape(session)
        regex = re.compile(regex + r"\Z")
        glob = file_pattern.format(subject="*", session=session)
        for p in raw_dir.glob(glob):
            m = regex.match(p.relative_to(raw_dir).as_posix())
            if m and p.is_file():
                found.setdefault(m.group("subject"), set()).add(session)
    order = list(sessions.values())
    return {s: [x for x in order if x in found[s]] for s in sorted(found)}


def format_subject_table(found: Mapping[str, Sequence[str]], sessions: Mapping[str, str] = DEFAULT_SESSIONS) -> str:
    """Printable table of :func:`list_subjects`: one row per subject, 'yes'/'-' per session, 'complete'."""
    heads = [f"{split}:{name}" for split, name in sessions.items()]
    rows = [["subject", *heads, "complete"]]
    for subj, present in found.items():
        marks = ["yes" if name in present else "-" for name in sessions.values()]
        rows.append([subj, *marks, "yes" if all(m == "yes" for m in marks) else "no"])
    if len(rows) == 1:
        return "no subject files found"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def prepare_subject(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    subject: str,
    *,
    file_pattern: str = DEFAULT_FILE_PATTERN,
    sessions: Mapping[str, str] = DEFAULT_SESSIONS,
    roi: str | Sequence[str] = DEFAULT_ROI,
    image_dir: str | os.PathLike | None = None,
    label_key: str = DEFAULT_LABEL_KEY,
    captions: str | os.PathLike | None = None,
    image_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the common format for one Deeprecon subject into ``out_dir``.

    Args:
        raw_dir: folder holding the BData files.
        out_dir: the subject's common-format folder (``common_format.subject_dir``).
        subject: subject code as it appears in the file names (``sub-01``, ``AM``); also used
            verbatim in the output file names (``train_stim_sub<subject>.npy``).
        file_pattern: file name relative to ``raw_dir`` with ``{subject}`` and ``{session}``.
        sessions: split → session name; splits are some of ``train``, ``test``, ``art``.
            Every listed session must exist (leave ``art`` out for subjects without shapes).
        roi: ROI metadata key (default ``ROI_VC``), or several keys whose union is taken, as a
            list or as one string joined by ``+`` (``'ROI_LVC + ROI_HVC'``).
        image_dir: folder searched recursively for ``<label>.<ext>``; default ``raw_dir/images``.
        label_key: per-row key naming the image (vmap), or ``stimulus_id`` (float encoding).
        captions: optional CSV/TSV captions table (``prepare_data.captions_table``); images
            without captions get ``''`` and a logged warning.
        image_size: None keeps the images' size (uniform within a split); N → N×N centre crop + resize.
        progress: show tqdm bars while reading images.

    Returns a summary: ``subject``, ``n_voxel``, ``roi``, ``n_<split>`` image counts, ``splits``
    (per split: n_img, n_rows, nrep_min/max, image_shape, source, captions_missing), ``files``.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_pattern(file_pattern)
    sessions = _check_sessions(sessions)
    tag = str(subject)

    # 1. every session file must exist before anything is read
    paths = {split: session_path(raw_dir, file_pattern, subject, name) for split, name in sessions.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"{missing[0]}: session file not found for subject {subject!r}"
            + (f" (also missing: {', '.join(str(p) for p in missing[1:])})" if len(missing) > 1 else "")
        )
    image_dir = Path(image_dir) if image_dir is not None else raw_dir / "images"
    images = ImageIndex(image_dir)
    table = load_captions_table(captions) if captions is not None else None

    # 2. read, select ROI voxels, average repetitions
    read: dict[str, dict] = {}
    for split, path in paths.items():
        logger.info("deeprecon sub %s: reading %s", subject, path)
        read[split] = read_session(path, roi, label_key)
    _check_same_voxels(read)

    # 3. images and captions for every image, still writing nothing
    planned = {}
    summary_splits = {}
    for split, sess in read.items():
        ids, means, nrep = average_by_label(sess["voxels"], sess["labels"])
        img_paths = images.find_all(ids, what=f"{split} label")
        shape = image_shape(img_paths, image_size, split)
        caps, no_caps = lookup_captions(table, ids, source=captions or "", what=f"{split} images")
        data = cf.SplitData(
            fmri=means.astype(np.float32),
            cap=cf.captions_array(caps),
            ids=np.array(ids, dtype=str),
            nrep=nrep.astype(np.int16),
        )
        planned[split] = (data, img_paths, shape)
        summary_splits[split] = {
            "n_img": len(ids), "n_rows": len(sess["labels"]), "n_rows_dropped": sess["n_dropped"],
            "nrep_min": int(nrep.min()), "nrep_max": int(nrep.max()), "image_shape": list(shape),
            "source": str(sess["path"]), "captions_missing": len(no_caps),
        }

    # 4. write
    files = write_splits(out_dir, tag, planned, image_size, progress)
    n_voxel = int(next(iter(read.values()))["voxels"].shape[1])
    used_roi = next(iter(read.values()))["roi"]
    summary = {
        "dataset": DATASET,
        "subject": tag,
        "n_voxel": n_voxel,
        "roi": " + ".join(used_roi),
        **{f"n_{split}": info["n_img"] for split, info in summary_splits.items()},
        "splits": summary_splits,
    }
    manifest = cf.write_manifest(
        out_dir, **summary, raw_dir=str(raw_dir), image_dir=str(image_dir),
        sources=[str(p) for p in paths.values()], captions=str(captions) if captions else None,
        config={"file_pattern": file_pattern, "sessions": sessions, "roi": roi, "label_key": label_key,
                "image_size": image_size, "average": "mean over rows per label, first-appearance order"},
    )
    summary["files"] = [str(p) for p in files] + [str(manifest)]
    return summary


def _check_same_voxels(read: Mapping[str, dict]) -> None:
    """All sessions must yield the same voxels (count, and coordinates when the files have them)."""
    items = list(read.values())
    ref = items[0]
    for other in items[1:]:
        if other["voxels"].shape[1] != ref["voxels"].shape[1]:
            raise UserError(
                f"{other['path']}: ROI has {other['voxels'].shape[1]} voxels but {ref['path']} has "
                f"{ref['voxels'].shape[1]}; all sessions of a subject must share one voxel set"
            )
        if ref["coords"] is not None and other["coords"] is not None:
            if not np.allclose(ref["coords"], other["coords"], equal_nan=True):
                raise UserError(
                    f"{other['path']}: ROI voxel coordinates (voxel_x/y/z) differ from {ref['path']}; "
                    f"all sessions of a subject must share one voxel set"
                )


# ---------------------------------------------------------------------------------------------
# the pipeline's hooks (pipeline.config.DATASETS): options from the [deeprecon] config section


def configured_sessions(section) -> dict[str, str]:
    """{split: session name} of the config section; an empty session name drops that split."""
    return {k: v for k, v in (("train", section.session_train), ("test", section.session_test),
                              ("art", section.session_art)) if v}


def prepare_from_config(cfg, out_dir: Path, subject: str, progress: bool = True) -> dict:
    s = cfg.deeprecon
    return prepare_subject(
        cfg.resolve_path(s.raw_dir), out_dir, subject, file_pattern=s.file_pattern, sessions=configured_sessions(s),
        roi=s.roi, image_dir=cfg.optional_path(s.image_dir), label_key=s.label_key,
        captions=cfg.optional_path(s.captions), image_size=s.image_size or None, progress=progress)


def subject_table(cfg) -> str:
    s = cfg.deeprecon
    sessions = configured_sessions(s)
    return format_subject_table(list_subjects(cfg.resolve_path(s.raw_dir), s.file_pattern, sessions), sessions)
