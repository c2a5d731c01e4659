"""Read a caption-variant file (``<name>_captions.npy`` + ``<name>_ids.npy``) in the order of a
training split, so the variant builder can replace the training captions (pipeline/variant.py).

Captions are matched by image id, never by position: the file may come from another subject's
split of the same images, or list the images in another order.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.errors import UserError
from pipeline.variant import rows_for_ids

log = logging.getLogger("recon")
SUFFIX = "_captions.npy"
IDS_SUFFIX = "_ids.npy"


def ids_path_for(path: str | os.PathLike) -> Path:
    """``.../low_short_captions.npy`` → ``.../low_short_ids.npy``."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise UserError(f"{path}: a caption-variant file must be named <name>{SUFFIX} (with <name>{IDS_SUFFIX} beside it)")
    return path.with_name(path.name[: -len(SUFFIX)] + IDS_SUFFIX)


def load_caption_variant(path: Path, ids: np.ndarray) -> np.ndarray:
    """Captions of ``path`` reordered to ``ids``: unicode (len(ids), n_cap) (n_cap = 1 for AI captions).

    Every id must be in the file (else UserError naming it); images without a caption ('' in every
    column, e.g. a failed generation) are kept as '' and counted in a warning.
    """
    path = Path(path)
    ids_path = ids_path_for(path)
    caps = io.load_npy(path)
    file_ids = io.load_npy(ids_path)
    if caps.dtype.kind != "U" or caps.ndim != 2:
        raise UserError(f"{path}: expected a unicode (n_images, n_captions) array, got {caps.dtype} {caps.shape}")
    if file_ids.ndim != 1 or len(file_ids) != len(caps):
        raise UserError(f"{ids_path}: expected {len(caps)} ids (one per row of {path.name}), got shape {file_ids.shape}")
    out = caps[rows_for_ids(file_ids, ids, ids_path, path, "caption")]
    empty = int(np.count_nonzero(~(np.char.str_len(np.char.strip(out)) > 0).any(axis=1)))
    if empty:
        log.warning("%s: %d of %d training images have no caption (generation failed); their CLIP-text "
                    "target is the empty-text embedding", path, empty, len(out))
    return out
