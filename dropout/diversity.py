"""Diversity-based training-set dropout ("low-level clustering", prior-art.md §3c, Experiment 1).

The precursor study embedded the training images in one of three spaces (pixels, DreamSim, CLIP
ViT-L/14 image embeddings), mapped them to 2-D with UMAP (n_neighbors 15, min_dist 0.1), ran k-means
with k = fraction·N and kept the image closest to each centroid. Each draw re-fits UMAP (and k-means)
with a new seed. It then picked draws by the spread of the kept set (variance and average
nearest-neighbour distance), which :func:`select_diverse` reports as diagnostics.

Embeddings: :func:`embed_pixels`, :func:`embed_clipvision`, :func:`embed_dreamsim`; selection:
:func:`select_diverse`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dropout.random import draw_seed_sequence, subset_size
from pipeline.errors import UserError

PIXEL_SIZE = 256  # the study flattened 256x256 RGB images
UMAP_COMPONENTS = 2
REDUCERS = ("umap", "none")
PROGRESS_MIN_ITEMS = 256
DREAMSIM_BATCH = 16
# below this many images umap-learn computes every pairwise distance exactly (its "small data" path);
# we hand it that matrix from one BLAS product instead of its per-pair numba metric (minutes at 196 608 dims)
UMAP_EXACT_MAX_N = 4096
FLOAT64_GRAM_MAX_ELEMENTS = 2 ** 25  # up to 256 MB: Gram products in float64
# files dreamsim 0.2.x needs for its default "ensemble" model (DINO B/16 + CLIP B/16 + OpenCLIP B/16 + LoRA);
# DINO's architecture and weights come through torch.hub, whose cache dreamsim points at the same folder.
DREAMSIM_FILES = (
    "dino_vitb16_pretrain.pth",
    "clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_pretrain.pth.tar",
    "ensemble_lora/adapter_config.json",
    "facebookresearch_dino_main/hubconf.py",
    "checkpoints/dino_vitbase16_pretrain.pth",
)


def _check_stim(stim: np.ndarray, what: str = "stim") -> None:
    if not hasattr(stim, "shape") or len(stim.shape) != 4 or stim.shape[-1] != 3 or stim.dtype != np.uint8:
        got = f"{getattr(stim, 'dtype', type(stim).__name__)} {getattr(stim, 'shape', '')}"
        raise UserError(f"{what}: expected uint8 images of shape (n, H, W, 3), got {got}")
    if stim.shape[0] < 1:
        raise UserError(f"{what}: no images")


# ---------------------------------------------------------------------------------------------
# embeddings


def embed_pixels(stim: np.ndarray, size: int = PIXEL_SIZE) -> np.ndarray:
    """Flattened pixels: each image resized to size x size (PIL bilinear), scaled to [0, 1].

    stim: (n, H, W, 3) uint8, may be a memory map (read one image at a time).
    Returns: (n, size*size*3) float32, rows in stim order, channel-last flattening.
    The output is filled in place, one image at a time, so the peak memory is the output itself
    (1200 images at 256 px: 0.9 GB).
    """
    _check_stim(stim)
    size = int(size)
    if size < 1:
        raise UserError(f"embed_pixels size: expected a positive integer, got {size}")
    n = stim.shape[0]
    out = np.empty((n, size * size * 3), dtype=np.float32)
    for i in tqdm(range(n), desc="pixel embedding", disable=n < PROGRESS_MIN_ITEMS):
        img = np.asarray(stim[i])
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
        np.divide(img.reshape(-1), np.float32(255), out=out[i], dtype=np.float32)
    return out


def embed_clipvision(clipvision_features: np.ndarray) -> np.ndarray:
    """CLIP ViT-L/14 image embedding of every image: the class-token row of the pipeline's features.

    Reuses the base CLIP-vision features the ``features`` step already wrote
    (``features/clipvision_train.npy``, (n, 257, D), D = 768 for ViT-L/14), so no CLIP model is
    loaded here. Row 0 of each image is the projected, post-LayerNorm class token scaled to unit
    norm — the CLIP image embedding (models/clip.py); rows 1..256 are the patch tokens.

    clipvision_features: (n, T, D), T >= 1 (a memory map is fine: only row 0 is read).
    Returns: (n, D) float32.
    """
    shape = getattr(clipvision_features, "shape", None)
    if shape is None or len(shape) != 3 or shape[0] < 1 or shape[1] < 1:
        raise UserError(f"clipvision features: expected shape (n, 257, D), got {shape}")
    emb = np.asarray(clipvision_features[:, 0, :], dtype=np.float32)
    if not np.all(np.isfinite(emb)):
        raise UserError("clipvision features: non-finite values in the class-token rows")
    return np.ascontiguousarray(emb)


@contextlib.contextmanager
def _safe_torch_loads(hub_dir: Path):
    """Inside: every torch.load is weights-only (no unpickling) and torch.hub reads ``hub_dir``; restored after."""
    import torch

    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    old_hub = torch.hub.get_dir()
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.hub.set_dir(str(hub_dir))
    try:
        yield
    finally:
        torch.hub.set_dir(old_hub)
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


def embed_dreamsim(stim: np.ndarray, weights_dir: str | os.PathLike, device: str = "cpu",
                   batch_size: int = DREAMSIM_BATCH) -> np.ndarray:
    """DreamSim (ensemble) embedding of every image, as the precursor's "dreamsim" space.

    Needs the optional ``dreamsim`` package (``pip install dreamsim==0.2.1``, the project's
    ``[dreamsim]`` extra) and its weights already unpacked in ``weights_dir`` (dreamsim's
    ``cache_dir``; nothing is downloaded here). Every ``torch.load`` runs weights-only.

    stim: (n, H, W, 3) uint8. Each image goes through dreamsim's own preprocessing (bicubic 224 px,
    [0, 1]). Returns: (n, d) float32 (d = 1792 for the ensemble), dreamsim-normalised embeddings.
    """
    _check_stim(stim)
    weights_dir = Path(weights_dir).expanduser()
    if importlib.util.find_spec("dreamsim") is None:
        raise UserError("diversity space 'dreamsim': the dreamsim package is not installed; "
                        "run `pip install dreamsim==0.2.1` (or the project's [dreamsim] extra), "
                        f"unpack its weights into {weights_dir}, or use space 'pixels' or 'clipvision'")
    missing = [f for f in DREAMSIM_FILES if not (weights_dir / f).exists()]
    if missing:
        raise UserError(f"diversity space 'dreamsim': {weights_dir} lacks {', '.join(missing)}; run "
                        "`python -c \"from dreamsim import dreamsim; dreamsim(cache_dir='<dir>', device='cpu')\"` "
                        "on a machine with internet and copy <dir> there, or use space 'pixels' or 'clipvision'")

    import torch
    from dreamsim import dreamsim

    with _safe_torch_loads(weights_dir):
        model, preprocess = dreamsim(pretrained=True, device=device, cache_dir=str(weights_dir))
    n = stim.shape[0]
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="dreamsim embedding", disable=n < PROGRESS_MIN_ITEMS):
            batch = torch.cat([preprocess(Image.fromarray(np.asarray(stim[i])))
                               for i in range(start, min(n, start + batch_size))]).to(device)
            chunks.append(model.embed(batch).reshape(batch.shape[0], -1).float().cpu().numpy())
    return np.concatenate(chunks).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# selection


def pairwise_euclidean(x: np.ndarray) -> np.ndarray:
    """All Euclidean distances between the rows of x (m, d) -> (m, m) float64, zero diagonal.

    One BLAS Gram matrix (float64 when x is small enough, float32 otherwise, to avoid a second
    copy of a large pixel embedding): d²(i, j) = G_ii + G_jj - 2 G_ij, clipped at 0.
    """
    x = np.asarray(x)
    if x.dtype != np.float64 and x.size <= FLOAT64_GRAM_MAX_ELEMENTS:
        x = x.astype(np.float64)
    gram = (x @ x.T).astype(np.float64, copy=False)
    sq = np.diag(gram).copy()
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2, out=d2)


def _mean_nn(dist: np.ndarray) -> float:
    """Mean distance from each item to its nearest other item, from a (m, m) distance matrix (0 if m < 2)."""
    if len(dist) < 2:
        return 0.0
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


def mean_nn_distance(x: np.ndarray, chunk: int = 512) -> float:
    """Mean Euclidean distance from each row of x (m, d) to its nearest other row (0.0 when m < 2).

    Computed a block of rows at a time, so memory stays at chunk·m even for large m.
    """
    m = len(x)
    if m < 2:
        return 0.0
    sq = np.concatenate([np.einsum("ij,ij->i", b, b, dtype=np.float64)
                         for b in (x[i:i + chunk].astype(np.float64) for i in range(0, m, chunk))])
    nn = np.empty(m, dtype=np.float64)
    for i in range(0, m, chunk):
        d2 = sq[i:i + chunk, None] + sq[None, :] - 2.0 * (x[i:i + chunk] @ x.T).astype(np.float64)
        rows = np.arange(i, min(m, i + chunk))
        d2[rows - i, rows] = np.inf
        nn[rows] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return float(nn.mean())


def total_variance(x: np.ndarray, chunk: int = 16384) -> float:
    """Sum over dimensions of the variance of x (m, d): the mean squared distance to the set's mean."""
    return float(sum(np.var(x[:, j:j + chunk], axis=0, dtype=np.float64).sum()
                     for j in range(0, x.shape[1], chunk)))


def nearest_unique(distances: np.ndarray) -> np.ndarray:
    """One distinct item per centroid, nearest first: greedy matching on the (k, n) distance matrix.

    Pairs are taken in increasing distance (ties: lower centroid, then lower item index); a pair is
    kept when neither its centroid nor its item is taken. So each centroid gets its nearest item
    unless a closer centroid already took it, in which case it gets its nearest unused one.
    Returns: (k,) int64 item per centroid (in centroid order).
    """
    k, n = distances.shape
    if k > n:
        raise UserError(f"cannot keep {k} distinct images out of {n}")
    order = np.argsort(distances, axis=None, kind="stable")
    centroid_of, item_of = np.unravel_index(order, distances.shape)
    chosen = np.full(k, -1, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    left = k
    for c, p in zip(centroid_of.tolist(), item_of.tolist()):
        if chosen[c] < 0 and not used[p]:
            chosen[c] = p
            used[p] = True
            left -= 1
            if left == 0:
                break
    return chosen


def select_diverse(embedding: np.ndarray, fraction: float, draw: int = 0, seed: int = 0,
                   n_neighbors: int = 15, min_dist: float = 0.1, reducer: str = "umap",
                   n_init: int = 10) -> tuple[np.ndarray, dict]:
    """Keep round(fraction·n) images spread over the embedding: UMAP → k-means → nearest image per centroid.

    1. ``reducer='umap'``: UMAP to 2-D (umap-learn, Euclidean, n_neighbors, min_dist);
       ``reducer='none'``: cluster the embedding as given.
    2. k-means (scikit-learn, k-means++, ``n_init`` restarts) with k = round(fraction·n).
    3. Per centroid the nearest image in the clustered space, distinct across centroids
       (:func:`nearest_unique`).
    UMAP and k-means are seeded from SeedSequence([seed, draw]): a (seed, draw) pair is reproducible,
    and each draw re-fits both, as the study's nine draws per space did.

    embedding: (n, d) float array, rows in training-set order.
    Returns: indices (k,) int64 sorted ascending and unique, and diagnostics (JSON-ready): k, n, the
    settings and seeds, and the spread (mean nearest-neighbour distance, total variance) of the kept
    set and of all images, both in the clustered space (``*_reduced``; 2-D UMAP, or the embedding
    itself when reducer='none') and in the original embedding space (``*_embedding``).
    """
    shape = getattr(embedding, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
        raise UserError(f"diversity embedding: expected shape (n >= 2, d), got {shape}")
    if reducer not in REDUCERS:
        raise UserError(f"diversity reducer {reducer!r}: expected one of {', '.join(REDUCERS)}")
    embedding = np.asarray(embedding, dtype=np.float32)
    if not np.all(np.isfinite(embedding)):
        raise UserError("diversity embedding: contains NaN or infinite values")
    n = embedding.shape[0]
    k = subset_size(n, fraction)
    if int(n_neighbors) < 2 or not (0.0 <= float(min_dist)):
        raise UserError(f"UMAP settings: n_neighbors must be >= 2 and min_dist >= 0, got {n_neighbors}, {min_dist}")
    umap_seed, kmeans_seed = (int(s) for s in draw_seed_sequence(seed, draw).generate_state(2))
    dist = pairwise_euclidean(embedding) if n < UMAP_EXACT_MAX_N else None

    # 1. the space k-means runs in
    if reducer == "umap":
        reduced = _umap_2d(embedding if dist is None else dist, dist is not None, int(n_neighbors),
                           float(min_dist), umap_seed)
    else:
        reduced = embedding

    # 2. k-means
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, n_init=int(n_init), random_state=kmeans_seed).fit(reduced)

    # 3. the nearest distinct image per centroid
    chosen = nearest_unique(kmeans.transform(reduced).T)
    indices = np.sort(chosen).astype(np.int64)

    diagnostics = {
        "k": int(k), "n": int(n), "fraction": float(fraction), "draw": int(draw), "seed": int(seed),
        "reducer": reducer, "n_neighbors": int(n_neighbors), "min_dist": float(min_dist),
        "umap_random_state": umap_seed if reducer == "umap" else None, "kmeans_random_state": kmeans_seed,
        "kmeans_inertia": float(kmeans.inertia_), "embedding_dim": int(embedding.shape[1]),
    }
    for name, space in (("reduced", reduced), ("embedding", embedding)):
        for subset, rows in (("kept", indices), ("all", None)):
            x = space if rows is None else space[rows]
            if name == "embedding" and dist is not None:
                nn = _mean_nn(dist if rows is None else dist[np.ix_(rows, rows)])
            else:
                nn = mean_nn_distance(x)
            diagnostics[f"mean_nn_distance_{subset}_{name}"] = nn
            diagnostics[f"variance_{subset}_{name}"] = total_variance(x)
    return indices, diagnostics


def _umap_2d(data: np.ndarray, precomputed: bool, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """UMAP (umap-learn) of the rows to 2-D, Euclidean; data is (n, d), or (n, n) distances when precomputed.

    Returns: (n, 2) float32.
    """
    import umap  # imported here: numba start-up costs seconds

    n = data.shape[0]
    reducer = umap.UMAP(n_components=UMAP_COMPONENTS, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist,
                        metric="precomputed" if precomputed else "euclidean", random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="using precomputed metric")
        return reducer.fit_transform(data).astype(np.float32)
