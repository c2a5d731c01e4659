"""Image grids a person can open: ground truth on top, one row per reconstruction set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import io

CELL = 128
LABEL_WIDTH = 80


def _cell(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        img = Image.open(img).convert("RGB")
    elif isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    return img.resize((CELL, CELL), Image.Resampling.BICUBIC)


def save_grid(path: Path, gts: np.ndarray, rows: dict[str, list], max_images: int = 8) -> Path:
    """Write a PNG grid: the first ``max_images`` test images, then each row of ``rows``.

    gts: (N, H, W, 3) uint8; rows: name → list of N images (paths, arrays or PIL images).
    """
    n = min(max_images, len(gts))
    all_rows = {"ground truth": list(gts[:n]), **{k: list(v[:n]) for k, v in rows.items()}}
    canvas = Image.new("RGB", (LABEL_WIDTH + n * CELL, len(all_rows) * CELL), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(all_rows.items()):
        draw.text((4, r * CELL + CELL // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            canvas.paste(_cell(img), (LABEL_WIDTH + c * CELL, r * CELL))
    with io.atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def variant_grid(path: Path, gts: np.ndarray, layouts: dict[str, object], kind: str = "versatile",
                 max_images: int = 8) -> Path | None:
    """A grid comparing one image set across variants (rows) for the same test images."""
    rows = {}
    n = min(max_images, len(gts))
    for name, layout in layouts.items():
        paths = [layout.image(kind, i) for i in range(n)]
        if all(p.is_file() for p in paths):
            rows[name] = paths
    if not rows:
        return None
    return save_grid(path, gts, rows, max_images)
