"""The common on-disk format between ``prepare`` and every later step (architecture.md §3).

Per dataset and subject, ``<data_dir>/<dataset>/sub<subject>/`` holds, for each split
(``train``, ``test``, and ``art`` for Deeprecon):

======================================  ===========================  =================================
file                                    dtype, shape                 meaning
======================================  ===========================  =================================
``<split>_fmriavg_general_sub<s>.npy``  float32 (n_img, n_voxel)     mean response over repetitions
``<split>_stim_sub<s>.npy``             uint8 (n_img, H, W, 3)       the images, same row order
``<split>_cap_sub<s>.npy``              ``<U..`` (n_img, n_cap)      captions, '' where fewer exist
``<split>_ids_sub<s>.npy``              unicode or int (n_img,)      dataset image ids
``<split>_nrep_sub<s>.npy``             int16 (n_img,)               repetitions averaged
``manifest.json``                                                    sources, config, versions, ROI
======================================  ===========================  =================================

This module is the only place that spells these names; readers validate on load and say which
file is wrong.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline import io
from pipeline.errors import UserError

SPLITS = ("train", "test", "art")
PARTS = ("fmri", "stim", "cap", "ids", "nrep")
_STEMS = {"fmri": "fmriavg_general", "stim": "stim", "cap": "cap", "ids": "ids", "nrep": "nrep"}


def subject_dir(data_dir: str | os.PathLike, dataset: str, subject: str | int) -> Path:
    """``<data_dir>/<dataset>/sub<subject>``."""
    return Path(data_dir) / dataset / f"sub{subject}"


def part_path(sub_dir: str | os.PathLike, split: str, part: str, subject: str | int) -> Path:
    """Path of one array of one split, e.g. ``train_stim_sub1.npy``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if part not in _STEMS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    return Path(sub_dir) / f"{split}_{_STEMS[part]}_sub{subject}.npy"


def manifest_path(sub_dir: str | os.PathLike) -> Path:
    return Path(sub_dir) / "manifest.json"


@dataclass
class SplitData:
    """One split of one subject; rows of every array refer to the same image."""

    fmri: np.ndarray | None = None
    stim: np.ndarray | None = None
    cap: np.ndarray | None = None
    ids: np.ndarray | None = None
    nrep: np.ndarray | None = None

    def __len__(self) -> int:
        for part in PARTS:
            arr = getattr(self, part)
            if arr is not None:
                return int(arr.shape[0])
        return 0


def captions_array(captions: Iterable[Iterable[str]]) -> np.ndarray:
    """Pack ragged caption lists into a fixed-width unicode array padded with ''."""
    rows = [[str(c) for c in row] for row in captions]
    n_cap = max((len(r) for r in rows), default=0)
    n_cap = max(n_cap, 1)
    width = max((len(c) for r in rows for c in r), default=1)
    out = np.full((len(rows), n_cap), "", dtype=f"<U{max(width, 1)}")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def validate_split(data: SplitData, where: str | os.PathLike = "") -> None:
    """Check shapes, dtypes and row counts; raise UserError naming the offending file."""
    where = Path(where)
    n = None
    for part in PARTS:
        arr = getattr(data, part)
        if arr is None:
            continue
        label = where if where.suffix == ".npy" else (where / part if str(where) else Path(part))
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise UserError(f"{label}: has {arr.shape[0]} rows but the other files of this split have {n}")
        if part == "fmri":
            if arr.ndim != 2:
                raise UserError(f"{label}: fMRI must be 2-D (n_img, n_voxel), got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise UserError(f"{label}: fMRI must be floating point, got {arr.dtype}")
            bad = ~np.isfinite(np.asarray(arr))
            if bad.any():
                rows, cols = np.nonzero(bad)
                raise UserError(
                    f"{label}: {bad.sum()} non-finite values (NaN/inf), e.g. image row {rows[0]}, voxel {cols[0]}"
                )
        elif part == "stim":
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise UserError(f"{label}: images must be uint8 (n_img, H, W, 3), got {arr.dtype} {arr.shape}")
        elif part == "cap":
            if arr.dtype.kind != "U" or arr.ndim != 2:
                raise UserError(f"{label}: captions must be a unicode (n_img, n_cap) array, got {arr.dtype} {arr.shape}")
        elif part in ("ids", "nrep"):
            if arr.ndim != 1:
                raise UserError(f"{label}: must be 1-D (n_img,), got shape {arr.shape}")


def write_split(sub_dir: str | os.PathLike, split: str, subject: str | int, data: SplitData) -> list[Path]:
    """Validate and write every non-None part of ``data`` atomically; return the paths written."""
    validate_split(data, Path(sub_dir) / f"{split} split")
    written = []
    for part in PARTS:
        arr = getattr(data, part)
        if arr is None:
            continue
        if part == "fmri":
            arr = np.asarray(arr, dtype=np.float32)
        elif part == "nrep":
            arr = np.asarray(arr, dtype=np.int16)
        written.append(io.save_npy(part_path(sub_dir, split, part, subject), arr))
    return written


def read_split(
    sub_dir: str | os.PathLike,
    split: str,
    subject: str | int,
    parts: Iterable[str] = PARTS,
    mmap: bool = True,
    validate: bool = True,
) -> SplitData:
    """Read the requested parts of one split (images memory-mapped by default) and validate them."""
    data = SplitData()
    for part in parts:
        path = part_path(sub_dir, split, part, subject)
        if not path.is_file():
            raise UserError(f"{path}: file not found (run the prepare step for this subject first)")
        mode = "r" if (mmap and part == "stim") else None
        setattr(data, part, io.load_npy(path, mmap_mode=mode))
    if validate:
        for part in parts:
            single = SplitData(**{part: getattr(data, part)})
            validate_split(single, part_path(sub_dir, split, part, subject))
        validate_split(data, Path(sub_dir) / f"{split} split")
    return data


def write_manifest(sub_dir: str | os.PathLike, **info) -> Path:
    """Record where the data came from (sources, config, versions, voxel count, ROI, time)."""
    from pipeline.provenance import versions

    record = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    record.update(info)
    return io.save_json(manifest_path(sub_dir), record)

