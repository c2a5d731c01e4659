"""Versions and digests recorded beside every output, so a result says what made it."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

_PACKAGES = ("numpy", "scipy", "torch", "torchvision", "scikit-learn", "scikit-image", "himalaya",
             "diffusers", "transformers", "open_clip_torch", "bdpy", "nibabel", "h5py", "pillow")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out["recon-diffuser"] = importlib.metadata.version("recon-diffuser")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def file_digest(path: str | os.PathLike, quick: bool = True) -> str:
    """A content digest; ``quick`` hashes size, mtime and the first/last MiB (large arrays)."""
    path = Path(path)
    h = hashlib.sha256()
    st = path.stat()
    if quick and st.st_size > 4 * 2**20:
        h.update(f"{st.st_size}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(2**20))
            fh.seek(-(2**20), os.SEEK_END)
            h.update(fh.read(2**20))
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(2**22), b""):
                h.update(block)
    return h.hexdigest()[:16]
