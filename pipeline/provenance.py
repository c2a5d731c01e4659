"""Package versions recorded beside every output, so a result says what made it (digests: pipeline.digests)."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

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
