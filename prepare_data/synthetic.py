"""The bundled synthetic demo dataset: generated, not downloaded, so the demo runs anywhere.

Each image is a coloured shape on a coloured background with a caption that says so. Its "fMRI"
is a fixed random linear read-out of the image (coarse pixels plus shape/colour attributes) with
Gaussian noise, so that ridge decoding works and the reconstruction pipeline has something real to
recover. Test images are "seen" three times and averaged, as in NSD.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.common_format import SplitData, captions_array, write_manifest, write_split

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 50),
    "purple": (140, 60, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "stripes")
POSITIONS = {"left": 0.3, "centre": 0.5, "right": 0.7}
N_REP_TEST = 3
PHOTO_EVERY = 8  # every 8th image is a random crop of one of scikit-image's bundled photos
PHOTOS = {"chelsea": "a photo of a tabby cat", "coffee": "a cup of coffee on a saucer",
          "astronaut": "an astronaut in a white suit in front of a flag",
          "rocket": "a rocket on a launch pad", "hubble_deep_field": "galaxies in the night sky"}
POOL_STREAM = 15  # stream tag of the miniature models' training pool (draw_pool)
_N_ATTRS = len(COLOURS) * 2 + len(SHAPES) + len(POSITIONS) + 1


def _photo(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A random square crop of a bundled photo, resized to ``size``."""
    import skimage.data
    from PIL import Image

    names = list(PHOTOS)
    name = names[int(rng.integers(len(names)))]
    img = getattr(skimage.data, name)()
    side = int(min(img.shape[:2]) * rng.uniform(0.6, 1.0))
    y0 = int(rng.integers(0, img.shape[0] - side + 1))
    x0 = int(rng.integers(0, img.shape[1] - side + 1))
    crop = Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BICUBIC)
    attrs = np.zeros(_N_ATTRS, dtype=np.float32)
    attrs[-1] = 1
    return np.asarray(crop, dtype=np.uint8), [PHOTOS[name], f"a picture: {PHOTOS[name]}"], attrs


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """One image (size, size, 3) uint8, its captions, and its attribute vector."""
    names = list(COLOURS)
    bg, fg = rng.choice(len(names), size=2, replace=False)
    shape = int(rng.integers(len(SHAPES)))
    pos_name = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    cx = POSITIONS[pos_name] * size
    cy = rng.uniform(0.35, 0.65) * size
    radius = rng.uniform(0.15, 0.3) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if SHAPES[shape] == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    elif SHAPES[shape] == "square":
        mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    elif SHAPES[shape] == "triangle":
        mask = (yy >= cy - radius) & (yy <= cy + radius) & (np.abs(xx - cx) <= (yy - (cy - radius)) / 2)
    else:
        mask = ((xx // max(2, int(radius / 3))) % 2 == 0) & (np.abs(yy - cy) <= radius)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = COLOURS[names[bg]]
    img[mask] = COLOURS[names[fg]]
    img += rng.normal(0, 6, img.shape)  # a little texture
    img = np.clip(img, 0, 255).astype(np.uint8)
    fgn, bgn, sn = names[fg], names[bg], SHAPES[shape]
    captions = [
        f"a {fgn} {sn} on a {bgn} background",
        f"a {sn} in {fgn} at the {pos_name}",
        f"{bgn} background with a {fgn} {sn}",
    ]
    attrs = np.zeros(_N_ATTRS, dtype=np.float32)
    attrs[fg] = 1
    attrs[len(names) + bg] = 1
    attrs[2 * len(names) + shape] = 1
    attrs[2 * len(names) + len(SHAPES) + list(POSITIONS).index(pos_name)] = 1
    return img, captions, attrs


def _readout(img: np.ndarray, attrs: np.ndarray) -> np.ndarray:
    size = img.shape[0]
    k = size // 8
    coarse = img[: k * 8, : k * 8].astype(np.float32).reshape(8, k, 8, k, 3).mean(axis=(1, 3)) / 255.0
    return np.concatenate([coarse.ravel() - 0.5, attrs])


def make_synthetic(n_train: int, n_test: int, n_voxels: int, image_size: int, noise: float, seed: int,
                   subject_seed: int = 0):
    """Return (train, test) SplitData. Images depend only on ``seed`` (shared by all subjects, as
    NSD's test images are); the read-out weights and noise depend on ``subject_seed`` too."""
    img_rng = np.random.default_rng(seed)
    brain_rng = np.random.default_rng([seed, subject_seed])
    splits = []
    weights = None
    for split_no, (n, n_rep) in enumerate(((n_train, 1), (n_test, N_REP_TEST))):
        stim = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        caps, feats = [], []
        for i in range(n):
            draw = _photo if i % PHOTO_EVERY == PHOTO_EVERY - 1 else _draw
            stim[i], c, a = draw(img_rng, image_size)
            caps.append(c)
            feats.append(_readout(stim[i], a))
        feats = np.stack(feats)
        if weights is None:
            n_feat = feats.shape[1]
            weights = brain_rng.normal(0, 1 / np.sqrt(n_feat), (n_feat, n_voxels)).astype(np.float32)
        trials = (feats @ weights)[None] + brain_rng.normal(0, noise, (n_rep, n, n_voxels))
        fmri = (300.0 * trials.mean(axis=0)).astype(np.float32)  # NSD-like units (x 300)
        splits.append(SplitData(fmri=fmri, stim=stim, cap=captions_array(caps),
                                ids=np.array([f"{('train', 'test')[split_no]}{i:05d}" for i in range(n)]),
                                nrep=np.full(n, n_rep, dtype=np.int16)))
    return splits[0], splits[1]


def draw_pool(n: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images (uint8 (n, S, S, 3)), their captions and attribute vectors (``colour_pair``)
    from the same generator as the subjects' images (every 8th a photo crop), drawn from their own
    stream ``default_rng([seed, POOL_STREAM])``: the training pool of the miniature models
    (``miniature.train``), disjoint from every subject's train and test images (those come from
    ``default_rng(synthetic.seed)``)."""
    rng = np.random.default_rng([seed, POOL_STREAM])
    stim = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    caps, attrs = [], np.empty((n, _N_ATTRS), dtype=np.float32)
    for i in range(n):
        draw = _photo if i % PHOTO_EVERY == PHOTO_EVERY - 1 else _draw
        stim[i], c, attrs[i] = draw(rng, image_size)
        caps.append(c)
    return stim, captions_array(caps), attrs


def colour_pair(attrs: np.ndarray) -> np.ndarray:
    """(n, n_attrs) attribute vectors -> (n,) int: ``fg * n_colours + bg`` of each drawn shape, -1 for
    a photo crop (which has no colours)."""
    k = len(COLOURS)
    pair = attrs[:, :k].argmax(1) * k + attrs[:, k:2 * k].argmax(1)
    return np.where(attrs[:, -1] > 0, -1, pair)


def prepare_subject(out_dir: Path, subject: str, *, n_train: int = 96, n_test: int = 8, n_voxels: int = 256,
                    image_size: int = 128, noise: float = 0.5, seed: int = 0) -> dict:
    """Write one synthetic subject in the common format (each subject gets its own seed offset)."""
    subject_seed = int(subject) if str(subject).isdigit() else sum(map(ord, str(subject)))
    train, test = make_synthetic(n_train, n_test, n_voxels, image_size, noise, seed, subject_seed)
    write_split(out_dir, "train", subject, train)
    write_split(out_dir, "test", subject, test)
    summary = {"dataset": "synthetic", "subject": str(subject), "n_train": n_train, "n_test": n_test,
               "n_voxels": n_voxels, "roi": "synthetic", "seed": seed, "subject_seed": subject_seed}
    write_manifest(out_dir, **summary)
    return summary


# ---------------------------------------------------------------------------------------------
# the pipeline's hooks (pipeline.config.DATASETS): options from the [synthetic] config section


def prepare_from_config(cfg, out_dir: Path, subject: str, progress: bool = True) -> dict:
    s = cfg.synthetic
    return prepare_subject(out_dir, subject, n_train=s.n_train, n_test=s.n_test, n_voxels=s.n_voxels,
                           image_size=s.image_size, noise=s.noise, seed=s.seed)


def subject_table(cfg) -> str:
    return "synthetic: any subject id (generated)"
