"""Versions and digests recorded beside every output, so a result says what made it."""
from __future__ import annotations

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


def file_digest(path: str | os.PathLike) -> str:
    """A digest of every byte of ``path`` (a same-size change anywhere in the file is seen)."""
    from pipeline.digests import content_digest

    return content_digest(path)
