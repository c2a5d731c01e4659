"""Image grids a person can open: ground truth on top, one row per reconstruction set.

    python -m evaluation.qualitative_eval --dataset nsd --runs 'sub1/base' 'sub1/random*' \
        --images 0 5 17 --kinds vdvae versatile --out grid.png
    python -m evaluation.qualitative_eval --dataset nsd --runs 'sub*/base' --random 8 --seed 0

Rows are labelled ``<run> <kind>``; columns are the chosen test images (or a seeded random pick).
"""
from __future__ import annotations

import fnmatch
import sys

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


def save_grid(path: Path, gts: np.ndarray, rows: dict[str, list], max_images: int = 8,
              columns: list[int] | None = None) -> Path:
    """Write a PNG grid: the first ``max_images`` test images, then each row of ``rows``.

    gts: (N, H, W, 3) uint8; rows: name → list of N images (paths, arrays or PIL images).
    """
    cols = columns if columns is not None else list(range(min(max_images, len(gts))))
    n = len(cols)
    all_rows = {"ground truth": [gts[i] for i in cols], **{k: [v[i] for i in cols] for k, v in rows.items()}}
    label_width = max(LABEL_WIDTH, 8 + 6 * max(len(k) for k in all_rows))  # PIL's default font: ~6 px/char
    canvas = Image.new("RGB", (label_width + n * CELL, len(all_rows) * CELL), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(all_rows.items()):
        draw.text((4, r * CELL + CELL // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            canvas.paste(_cell(img), (label_width + c * CELL, r * CELL))
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


def main(argv=None) -> int:
    from pipeline.cli import build_parser, config_from_args, guarded
    from pipeline.config import DATASET_NAMES
    from pipeline.common_format import read_split
    from pipeline.errors import UserError
    from pipeline.layout import Layout, dataset_results, summary_dir

    parser = build_parser(None, prog="python -m evaluation.qualitative_eval", steps=False)
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--runs", nargs="+", default=["sub*/base"], metavar="GLOB")
    parser.add_argument("--kinds", nargs="+", default=["vdvae", "versatile"], help="image sets per run")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--images", nargs="+", type=int, help="test image indices")
    pick.add_argument("--random", type=int, default=8, help="this many random test images (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default <results>/<dataset>/summary/grid.png)")
    args = parser.parse_args(argv)

    def go():
        cfg = config_from_args(args, args.dataset)
        root = dataset_results(cfg)
        runs = sorted(p.relative_to(root).as_posix() for p in root.glob("sub*/*") if (p / "images").is_dir())
        chosen = [r for r in runs if any(fnmatch.fnmatch(r, g) for g in args.runs)]
        if not chosen:
            raise UserError(f"{root}: no run with images matches {' '.join(args.runs)}")
        first = chosen[0].split("/")[0][len("sub"):]
        gts = read_split(Layout(cfg, first).data_dir, "test", first, parts=("stim",)).stim
        n = len(gts)
        cols = args.images or sorted(np.random.default_rng(args.seed).choice(n, min(args.random, n), replace=False))
        if any(not 0 <= c < n for c in cols):
            raise UserError(f"--images: indices must lie in 0..{n - 1}")
        rows = {}
        for run in chosen:
            sub, variant = run.split("/")
            layout = Layout(cfg, sub[len("sub"):], variant)
            for kind in args.kinds:
                paths = [layout.image(kind, i) for i in range(n)]
                if all(paths[c].is_file() for c in cols):
                    rows[f"{run} {kind}"] = paths
        out = Path(args.out) if args.out else summary_dir(cfg) / "grid.png"
        save_grid(out, np.asarray(gts), rows, columns=[int(c) for c in cols])
        print(f"grid of {len(rows)} rows × {len(cols)} images: {out}")

    return guarded(go, args.debug)


if __name__ == "__main__":
    sys.exit(main())
