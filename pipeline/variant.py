"""Training-set variants: a name plus small files that change the training set, nothing else.

Experiments (dropout, AI captions, adversarial perturbations) never touch the steps; they write a
variant folder (``layout.variant_dir()``) and the steps read it through :func:`load_variant`:

=================================  ==================================  ===============================
file                               dtype, shape                        effect
=================================  ==================================  ===============================
``train_indices.npy``              int64 (k,)                          keep these rows of the base
                                                                       training set (in this order)
``train_captions.npy``             ``<U..`` (n_train, n_cap)           replaces the training captions
                                                                       (→ CLIP-text train features)
``train_stim_clipvision.npy``      uint8 (n_train, H, W, 3)            images CLIP-vision sees in
                                                                       training (perturbations)
``variant.json``                                                       name, kind, parameters
=================================  ==================================  ===============================

Replacement arrays always have the base training row count; ``train_indices`` is applied last.
The test set is never changed, and reconstruction-time settings live in the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.config import BASE_VARIANT
from pipeline.errors import UserError
from pipeline.layout import Layout

INDICES = "train_indices.npy"
CAPTIONS = "train_captions.npy"
STIM_CLIPVISION = "train_stim_clipvision.npy"
INFO = "variant.json"


@dataclass
class Variant:
    name: str = BASE_VARIANT
    indices: np.ndarray | None = None
    captions: np.ndarray | None = None
    stim_clipvision: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def changed_targets(self) -> list[str]:
        """Training targets that must be re-extracted (not merely subset) for this variant."""
        out = []
        if self.captions is not None:
            out.append("cliptext")
        if self.stim_clipvision is not None:
            out.append("clipvision")
        return out


def write_variant(layout: Layout, kind: str, *, indices=None, captions=None, stim_clipvision=None,
                  **params) -> Path:
    """Write a variant's defining files (atomically, the info file last)."""
    if layout.variant == BASE_VARIANT:
        raise UserError(f"the variant name {BASE_VARIANT!r} is reserved for the unchanged training set")
    d = layout.variant_dir()
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or len(np.unique(indices)) != len(indices):
            raise UserError(f"{d / INDICES}: indices must be 1-D and unique")
        io.save_npy(d / INDICES, indices)
    if captions is not None:
        io.save_npy(d / CAPTIONS, np.asarray(captions))
    if stim_clipvision is not None:
        io.save_npy(d / STIM_CLIPVISION, np.asarray(stim_clipvision, dtype=np.uint8))
    io.save_json(d / INFO, {"name": layout.variant, "kind": kind, "params": params})
    return d


def variant_exists(layout: Layout) -> bool:
    return layout.variant == BASE_VARIANT or (layout.variant_dir() / INFO).is_file()


def load_variant(layout: Layout, n_train: int | None = None) -> Variant:
    """The variant of ``layout`` ('base' → no change); checks shapes against ``n_train``."""
    if layout.variant == BASE_VARIANT:
        return Variant()
    d = layout.variant_dir()
    if not (d / INFO).is_file():
        raise UserError(f"{d / INFO}: variant {layout.variant!r} is not defined (create it with re_recon_main.py)")
    v = Variant(name=layout.variant, info=io.load_json(d / INFO))
    if (d / INDICES).is_file():
        v.indices = io.load_npy(d / INDICES)
        if v.indices.ndim != 1 or not np.issubdtype(v.indices.dtype, np.integer):
            raise UserError(f"{d / INDICES}: expected 1-D integer row indices, got {v.indices.dtype} "
                            f"{v.indices.shape}")
        if len(np.unique(v.indices)) != len(v.indices):
            raise UserError(f"{d / INDICES}: indices must be unique")
    if (d / CAPTIONS).is_file():
        v.captions = io.load_npy(d / CAPTIONS)
    if (d / STIM_CLIPVISION).is_file():
        v.stim_clipvision = io.load_npy(d / STIM_CLIPVISION, mmap_mode="r")
    if n_train is not None:
        if v.indices is not None and (v.indices.min(initial=0) < 0 or v.indices.max(initial=0) >= n_train):
            raise UserError(f"{d / INDICES}: indices outside 0..{n_train - 1}")
        for name, arr in ((CAPTIONS, v.captions), (STIM_CLIPVISION, v.stim_clipvision)):
            if arr is not None and arr.shape[0] != n_train:
                raise UserError(f"{d / name}: has {arr.shape[0]} rows, the training set has {n_train}")
    return v


def variant_files(layout: Layout) -> list[Path]:
    if layout.variant == BASE_VARIANT:
        return []
    d = layout.variant_dir()
    return [d / n for n in (INFO, INDICES, CAPTIONS, STIM_CLIPVISION) if (d / n).is_file()]


def rows_for_ids(file_ids: np.ndarray, ids: np.ndarray, ids_path: Path, data_path: Path, what: str) -> np.ndarray:
    """Rows of a variant file (whose row ids are ``file_ids``) for the training ``ids``, in their order.

    Variant files (AI captions, perturbation sets) are made once and matched by image id, so one
    file serves every subject that saw the same images. Duplicate ids, or an id without a row, are
    UserErrors naming the file.
    """
    row_of = {str(k): r for r, k in enumerate(np.asarray(file_ids))}
    if len(row_of) != len(file_ids):
        raise UserError(f"{ids_path}: image ids are not unique")
    wanted = [str(i) for i in np.asarray(ids)]
    missing = [k for k in wanted if k not in row_of]
    if missing:
        raise UserError(f"{data_path}: no {what} for {len(missing)} training image id(s), e.g. {missing[:3]} "
                        f"(ids from {Path(ids_path).name}); regenerate it for this training set")
    return np.array([row_of[k] for k in wanted], dtype=np.int64)
