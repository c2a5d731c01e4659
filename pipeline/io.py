"""Atomic writes and pickle-free reads.

Every artefact is written to a temporary name in the same folder and renamed into place, so a
killed job never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array atomically (no pickle: object arrays are refused)."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to save an object array to {path}: it would need pickle")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return Path(path)


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """Load an array without ever unpickling; a missing or unreadable file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except ValueError as exc:  # object arrays, corrupt headers
        raise UserError(f"{path}: cannot read as a plain numpy array ({exc})") from None


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, pretty-printed (paths and numpy scalars become plain values)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None


def save_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image or an (H, W, 3) uint8 array as PNG, atomically."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> Iterator[np.ndarray]:
    """Yield a writable ``.npy`` memmap that appears at ``path`` only when the block succeeds.

    For outputs too large for RAM (NSD stimuli, VDVAE latents): fill it row by row.
    """
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        yield arr
        arr.flush()
        del arr


def save_figure(path: str | os.PathLike, fig) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
