"""A tiny Deeprecon raw folder written with bdpy in the lab's BData layout (datasets.md §2.10).

``make_deeprecon_fixture(root)`` writes, per subject, ``<subject>_<session>_volume_native.h5`` for
ImageNetTraining / ImageNetTest / ArtificialShapes (rows = stimulus blocks; columns ``VoxelData``,
``Run``, ``Block``, ``stimulus_name`` with a vmap, and ``stimulus_id`` float codes in the natural-image
files; per-voxel ``voxel_x/y/z`` and 0/1 ROI flags), synthetic images under ``root/images`` (JPEG,
jpg, png and TIFF, in per-session sub-folders) and a long-format captions table. It returns the ground
truth, and :func:`expected_split` computes the averages naively from it, independently of the loader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FILE_PATTERN = "{subject}_{session}_volume_native.h5"
SESSIONS = {"train": "ImageNetTraining", "test": "ImageNetTest", "art": "ArtificialShapes"}
# split → (n_images, n_repetitions)
DESIGN = {"train": (6, 5), "test": (3, 4), "art": (2, 3)}
ROI_PARTS = ("ROI_V1", "ROI_V2", "ROI_V3", "ROI_hV4", "ROI_HVC")
N_OUTSIDE = 5  # trailing voxels in no ROI, so ROI_VC is a strict subset of VoxelData
SHAPE_NAMES = ("colorExpStim01_red_square", "colorExpStim07_green_smallring", "colorExpStim13_blue_largering",
               "colorExpStim19_yellow_+", "colorExpStim25_magenta_X")
TEST_EXTS = (".JPEG", ".jpg", ".png")


def labels_for(split: str, n: int) -> list[str]:
    """Image names in the real spelling: ``n<8-digit wnid>_<number>`` or ``colorExpStimNN_<color>_<shape>``."""
    if split == "art":
        return list(SHAPE_NAMES[:n])
    base = {"train": 1_000_000, "test": 2_000_000}[split]
    return [f"n{base + k:08d}_{(100 if split == 'train' else 200) + k}" for k in range(n)]


def stimulus_id(label: str) -> float:
    """Inverse of the lab's float encoding: ``n01000000_100`` → 1000000.000100."""
    wnid, num = label[1:].split("_")
    return int(wnid) + int(num) / 1e6


def _image(rng, px: int, colour: np.ndarray) -> np.ndarray:
    """A smooth colour ramp (survives JPEG well) with a distinct base colour per image."""
    ramp = np.linspace(0, 60, px)[None, :, None] + np.linspace(0, 40, px)[:, None, None]
    img = colour[None, None, :] + ramp + rng.integers(0, 4, (px, px, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def roi_columns(n_voxels: int) -> dict[str, np.ndarray]:
    """Voxel indices (within VoxelData) flagged by each ROI key of the fixture."""
    parts = np.array_split(np.arange(n_voxels - N_OUTSIDE), len(ROI_PARTS))
    cols = {k: p for k, p in zip(ROI_PARTS, parts)}
    cols["ROI_LVC"] = np.concatenate(parts[:3])
    cols["ROI_VC"] = np.arange(n_voxels - N_OUTSIDE)
    cols["hcp180_V1"] = parts[0]
    return cols


def _write_bdata(path: Path, voxels, runs, blocks, codes, vmap, stim_ids, coords, rois) -> None:
    import bdpy

    bd = bdpy.BData()
    bd.add(voxels, "VoxelData")
    bd.add(runs.astype(float), "Run")
    bd.add(blocks.astype(float), "Block")
    bd.add(codes, "stimulus_name")
    bd.add_vmap("stimulus_name", dict(vmap))
    if stim_ids is not None:
        bd.add(stim_ids, "stimulus_id")
    for axis, key in enumerate(("voxel_x", "voxel_y", "voxel_z")):
        bd.add_metadata(key, coords[:, axis], f"Voxel {key[-1]} coordinate", where="VoxelData")
    n_vox = voxels.shape[1]
    for key, cols in rois.items():
        flag = np.zeros(n_vox)
        flag[cols] = 1
        bd.add_metadata(key, flag, f"1 = ROI {key}", where="VoxelData")
    path.parent.mkdir(parents=True, exist_ok=True)
    bd.save(str(path))


def make_deeprecon_fixture(
    root: str | Path,
    subjects=("sub-01",),
    *,
    sessions: dict | None = None,
    design: dict | None = None,
    n_voxels: int = 50,
    image_px: int = 32,
    art_px: int = 40,
    rest_rows: int = 0,
    captions: bool = True,
    seed: int = 0,
) -> dict:
    """Write the fixture under ``root``; return its ground truth.

    Returns ``{'raw_dir', 'image_dir', 'captions' (path or None), 'caption_table' {label: [captions]},
    'file_pattern', 'sessions', 'roi_columns' {key: voxel indices}, 'subjects': {subject: {split:
    {'path', 'voxels' (n_rows, n_voxels), 'labels' (None for rest rows), 'ids' (first-appearance
    order), 'images' {label: path}}}}}``. ``rest_rows`` adds rows with a NaN ``stimulus_name``.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    sessions = dict(SESSIONS if sessions is None else sessions)
    design = dict(DESIGN if design is None else design)
    rois = roi_columns(n_voxels)
    image_dir = root / "images"
    folders = {"train": "training", "test": "test", "art": "art"}

    # images are shared by all subjects, as in the real data
    images: dict[str, dict[str, Path]] = {}
    for split in sessions:
        n_img, _ = design[split]
        images[split] = {}
        for k, label in enumerate(labels_for(split, n_img)):
            colour = rng.integers(20, 150, 3).astype(float)
            if split == "art":
                px, ext = art_px, ".tiff"
            else:
                px, ext = image_px, (".JPEG" if split == "train" else TEST_EXTS[k % len(TEST_EXTS)])
            path = image_dir / folders[split] / f"{label}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, px, colour)).save(path)
            images[split][label] = path

    truth = {"raw_dir": root, "image_dir": image_dir, "file_pattern": FILE_PATTERN, "sessions": sessions,
             "roi_columns": rois, "n_voxels": n_voxels, "subjects": {}}
    for subject in subjects:
        coords = np.round(rng.uniform(-60, 60, (n_voxels, 3)), 1)
        truth["subjects"][subject] = {}
        for split, session in sessions.items():
            n_img, n_rep = design[split]
            labels = labels_for(split, n_img)
            row_labels: list[str | None] = []
            runs = []
            for r in range(n_rep):
                row_labels += [labels[i] for i in rng.permutation(n_img)]
                runs += [r + 1] * n_img
            for _ in range(rest_rows):  # blank rows at random places
                at = int(rng.integers(0, len(row_labels) + 1))
                row_labels.insert(at, None)
                runs.insert(at, runs[min(at, len(runs) - 1)])
            n_rows = len(row_labels)
            code_of = {lab: float(c + 1) for c, lab in enumerate(rng.permutation(labels))}
            codes = np.array([np.nan if lab is None else code_of[lab] for lab in row_labels])
            stim_ids = None
            if split != "art":
                stim_ids = np.array([np.nan if lab is None else stimulus_id(lab) for lab in row_labels])
            voxels = rng.normal(0.0, 1.0, (n_rows, n_voxels))
            path = root / FILE_PATTERN.format(subject=subject, session=session)
            _write_bdata(path, voxels, np.array(runs), np.arange(1, n_rows + 1), codes,
                         {c: lab for lab, c in code_of.items()}, stim_ids, coords, rois)
            ids = list(dict.fromkeys(lab for lab in row_labels if lab is not None))
            truth["subjects"][subject][split] = {"path": path, "voxels": voxels, "labels": row_labels,
                                                 "ids": ids, "images": images[split], "coords": coords}

    truth["captions"] = None
    truth["caption_table"] = {}
    if captions:
        # long format, one row per caption; the first train image and all shapes have none
        lines = ["image\tcaption"]
        for split in ("train", "test"):
            for k, label in enumerate(images.get(split, {})):
                if split == "train" and k == 0:
                    continue
                caps = [f"{split} image {k} caption {j}" for j in range(1 + k % 3)]
                truth["caption_table"][label] = caps
                # names with extension for test images, without for train: the loader matches both
                name = images[split][label].name if split == "test" else label
                lines += [f"{name}\t{c}" for c in caps]
        truth["captions"] = root / "captions.tsv"
        truth["captions"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return truth


def expected_split(truth: dict, subject: str, split: str, roi_keys=("ROI_VC",)) -> dict:
    """Naive reference: per image (first-appearance order), the mean of its rows over the ROI columns.

    Returns ``{'ids', 'fmri' float64 (n_img, n_roi_voxel), 'nrep', 'columns'}``.
    """
    info = truth["subjects"][subject][split]
    cols = np.unique(np.concatenate([truth["roi_columns"][k] for k in roi_keys]))
    labels = np.array(["" if lab is None else lab for lab in info["labels"]])
    fmri, nrep = [], []
    for lab in info["ids"]:
        rows = labels == lab
        fmri.append(info["voxels"][rows][:, cols].sum(axis=0) / rows.sum())
        nrep.append(int(rows.sum()))
    return {"ids": info["ids"], "fmri": np.array(fmri), "nrep": np.array(nrep), "columns": cols}
