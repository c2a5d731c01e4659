"""Captions supplied by the user as a CSV/TSV table: image name → list of captions.

Deeprecon and THINGS ship no public captions (datasets.md §2.1; prior-art.md §3c), so the user
brings their own table. Two shapes are accepted, and may be mixed in one file:

* **wide**: one row per image, several caption columns::

      image_name,caption1,caption2,caption3
      n01518878_5958.JPEG,a bird on a branch,an ostrich,...

* **long**: one row per caption, the image name repeated::

      image	caption
      dog_12s.jpg	a dog on grass
      dog_12s.jpg	a brown dog

Column rules (names compared case-insensitively):

* the **name column** is the first column called one of :data:`NAME_COLUMNS`
  (``image``, ``image_name``, ``name``, ``stimulus``, ``stimulus_name``, ``filename``, ``file``,
  ``content_id``); the value may carry an extension or not (see :func:`lookup_captions`);
* the **caption columns** are every other column whose name starts with ``caption``
  (``caption``, ``caption1``, ``caption_2``, ``captions`` …), in table order.

Other columns are ignored. Empty cells are skipped, so images with fewer captions are fine.
Captions of one image keep their order: left to right within a row, then top to bottom.
The separator is a tab for ``.tsv``/``.tab`` files and a comma for ``.csv``; for any other
suffix it is a tab when the header line holds one, else a comma. Files are read as UTF-8
(a byte-order mark is ignored); quoted cells may contain commas and newlines.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

NAME_COLUMNS = ("image", "image_name", "name", "stimulus", "stimulus_name", "filename", "file", "content_id")
CAPTION_PREFIX = "caption"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tiff", ".tif", ".bmp", ".webp")


def _separator(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    with open(path, encoding="utf-8-sig") as fh:
        header = fh.readline()
    return "\t" if "\t" in header else ","


def load_captions_table(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a wide or long captions table (module docstring) into ``{image name: [captions]}``.

    Names are kept exactly as written (stripped of surrounding spaces); an image listed with
    only empty caption cells maps to ``[]``. Raises UserError for a missing file, a table
    without a name or caption column, or a row without an image name.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: captions table not found")
    try:
        table = pd.read_csv(
            path, sep=_separator(path), dtype=str, keep_default_na=False, encoding="utf-8-sig"
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read captions table ({exc})") from None

    lower = {str(c).strip().lower(): c for c in table.columns}
    name_col = next((lower[n] for n in NAME_COLUMNS if n in lower), None)
    if name_col is None:
        raise UserError(
            f"{path}: no image-name column; expected one of {list(NAME_COLUMNS)}, "
            f"found columns {[str(c) for c in table.columns]}"
        )
    cap_cols = [c for c in table.columns if c != name_col and str(c).strip().lower().startswith(CAPTION_PREFIX)]
    if not cap_cols:
        raise UserError(
            f"{path}: no caption column; expected columns named 'caption', 'caption1', ... "
            f"found {[str(c) for c in table.columns]}"
        )

    captions: dict[str, list[str]] = {}
    for row_no, (name, *cells) in enumerate(table[[name_col, *cap_cols]].itertuples(index=False), start=2):
        name = str(name).strip()
        if not name:
            raise UserError(f"{path}: line {row_no} has an empty image name in column {name_col!r}")
        entry = captions.setdefault(name, [])
        entry.extend(c.strip() for c in cells if c is not None and c.strip())
    return captions


def _stem(name: str) -> str:
    """``dog_12s.jpg`` → ``dog_12s``; names without an image suffix are returned unchanged."""
    root, ext = os.path.splitext(name)
    return root if ext.lower() in IMAGE_SUFFIXES else name


def lookup_captions(
    table: Mapping[str, list[str]] | None,
    ids: Iterable[str],
    *,
    source: str | os.PathLike = "",
    what: str = "images",
) -> tuple[list[list[str]], list[str]]:
    """Captions for each id, in order, and the ids that have none.

    A table name matches an id when they are equal, or equal after dropping an image suffix
    on either side (``n01518878_5958.JPEG`` matches ``n01518878_5958``). Ids without captions
    get ``[]`` (which :func:`pipeline.common_format.captions_array` pads to ``''``) and one
    warning is logged; a missing table (``None``) is a warning too, not an error.
    """
    ids = [str(i) for i in ids]
    if table is None:
        if ids:
            logger.warning("no captions table given: all %d %s get an empty caption ''", len(ids), what)
        return [[] for _ in ids], list(ids)
    by_stem: dict[str, list[str]] = {}
    for name, caps in table.items():
        by_stem.setdefault(_stem(name), caps)
    rows, missing = [], []
    for i in ids:
        caps = table.get(i)
        if caps is None:
            caps = by_stem.get(_stem(i), [])
        if not caps:
            missing.append(i)
        rows.append(list(caps))
    if missing:
        logger.warning(
            "%s: %d of %d %s have no caption and get '' (first: %s)",
            source or "captions table", len(missing), len(ids), what, ", ".join(missing[:5]),
        )
    return rows, missing
