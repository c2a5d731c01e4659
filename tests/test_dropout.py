"""Training-set dropout selectors: random, diversity (UMAP + k-means) and plain/heterogeneous backgrounds."""
import importlib.util

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cdist

from dropout import diversity
from dropout.plain_background import dominant_colour_counts, plainness_ranking, select_plain
from dropout.random import select_random, subset_size
from pipeline.errors import UserError


def _check_indices(idx, n, k):
    assert idx.dtype == np.int64 and idx.ndim == 1 and len(idx) == k
    assert np.all(np.diff(idx) > 0)  # sorted ascending and unique
    assert idx.min() >= 0 and idx.max() < n


# ---------------------------------------------------------------------------------------------
# random


@pytest.mark.parametrize("fraction,k", [(0.75, 900), (0.5, 600), (0.25, 300), (0.1, 120), (1.0, 1200)])
def test_random_size_and_determinism(fraction, k):
    a = select_random(1200, fraction, draw=3, seed=7)
    _check_indices(a, 1200, k)
    np.testing.assert_array_equal(a, select_random(1200, fraction, draw=3, seed=7))
    if k < 1200:
        assert not np.array_equal(a, select_random(1200, fraction, draw=4, seed=7))
        assert not np.array_equal(a, select_random(1200, fraction, draw=3, seed=8))


def test_random_draws_differ_and_are_uniform():
    draws = [select_random(40, 0.25, draw=d) for d in range(400)]
    assert len({tuple(d) for d in draws}) == 400
    hits = np.bincount(np.concatenate(draws), minlength=40)  # each index kept ~ Binomial(400, 0.25)
    assert hits.sum() == 400 * 10
    assert np.all(np.abs(hits - 100) < 45), hits  # > 5 sd would mean a biased sampler


def test_subset_size_rounds_half_up():
    assert subset_size(10, 0.25) == 3  # 2.5 -> 3
    assert subset_size(10, 0.24) == 2
    assert subset_size(1200, 0.1) == 120
    assert subset_size(7, 1.0) == 7


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, 2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_fraction_is_user_error(fraction):
    with pytest.raises(UserError, match="fraction"):
        select_random(100, fraction)
    with pytest.raises(UserError, match="fraction"):
        select_plain(np.zeros((4, 8, 8, 3), np.uint8), "monotone", fraction)
    with pytest.raises(UserError, match="fraction"):
        diversity.select_diverse(np.zeros((4, 2), np.float32), fraction, reducer="none")


def test_fraction_keeping_nothing_and_bad_seed_are_user_errors():
    with pytest.raises(UserError, match="keeps none"):
        select_random(5, 0.05)
    with pytest.raises(UserError, match="seed"):
        select_random(5, 0.5, draw=-1)


# ---------------------------------------------------------------------------------------------
# diversity


def _clusters(n_clusters=5, per=20, dim=10, seed=0):
    """Well-separated Gaussian blobs; returns embedding (n, dim) float32 and labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 50
    labels = rng.permutation(np.repeat(np.arange(n_clusters), per))
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_nearest_unique_resolves_shared_nearest_image():
    # both centroids are nearest to image 0; centroid 1 is closer, so centroid 0 takes its next nearest
    d = np.array([[0.2, 0.3, 0.9], [0.1, 0.5, 0.8]])
    np.testing.assert_array_equal(diversity.nearest_unique(d), [1, 0])
    d = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.8]])
    np.testing.assert_array_equal(diversity.nearest_unique(d), [0, 1])
    # three centroids on one image: each later one gets its nearest still unused image
    d = np.array([[0.0, 1.0, 2.0, 3.0], [0.1, 3.0, 1.5, 2.5], [0.2, 2.0, 1.2, 0.4]])
    np.testing.assert_array_equal(diversity.nearest_unique(d), [0, 2, 3])


def test_diverse_without_reducer_picks_the_medoid_of_each_planted_cluster():
    emb, labels = _clusters()
    idx, diag = diversity.select_diverse(emb, 0.05, draw=1, seed=2, reducer="none")
    _check_indices(idx, 100, 5)
    assert sorted(labels[idx]) == [0, 1, 2, 3, 4]
    # with clusters this far apart k-means' centroids are the cluster means: the kept image of each
    # cluster is the one nearest its mean
    expected = [np.flatnonzero(labels == c)[np.argmin(((emb[labels == c] - emb[labels == c].mean(0)) ** 2).sum(1))]
                for c in range(5)]
    np.testing.assert_array_equal(idx, np.sort(expected))
    # diagnostics against an independent computation
    assert diag["k"] == 5 and diag["n"] == 100 and diag["reducer"] == "none"
    kept = emb[idx].astype(np.float64)
    dist = cdist(kept, kept)
    np.fill_diagonal(dist, np.inf)
    assert diag["mean_nn_distance_kept_embedding"] == pytest.approx(dist.min(1).mean(), rel=1e-4)
    assert diag["variance_kept_embedding"] == pytest.approx(kept.var(0).sum(), rel=1e-6)
    assert diag["mean_nn_distance_kept_reduced"] == pytest.approx(diag["mean_nn_distance_kept_embedding"])
    # one image per cluster is far more spread out than the full set, whose nearest neighbour is in-cluster
    assert diag["mean_nn_distance_kept_embedding"] > 10 * diag["mean_nn_distance_all_embedding"]


def test_distance_helpers_match_scipy():
    x = np.random.default_rng(4).normal(size=(37, 9)) * 3 + 5
    ref = cdist(x, x)
    np.testing.assert_allclose(diversity.pairwise_euclidean(x.astype(np.float32)), ref, atol=1e-5)
    np.fill_diagonal(ref, np.inf)
    assert diversity.mean_nn_distance(x, chunk=8) == pytest.approx(ref.min(1).mean(), rel=1e-9)
    assert diversity.total_variance(x, chunk=4) == pytest.approx(x.var(0).sum(), rel=1e-12)


def test_diverse_keeps_distinct_images_when_k_is_close_to_n():
    emb = np.random.default_rng(3).normal(size=(30, 4)).astype(np.float32)
    idx, _ = diversity.select_diverse(emb, 0.9, reducer="none")
    _check_indices(idx, 30, 27)


@pytest.mark.slow  # ~10 s of numba compilation on the first UMAP fit in a process
@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # the planted clusters are disjoint
def test_diverse_with_umap_picks_one_per_cluster_reproducibly():
    emb, labels = _clusters(per=16, dim=12, seed=1)
    idx, diag = diversity.select_diverse(emb, 5 / 80, draw=0, seed=0)
    _check_indices(idx, 80, 5)
    assert sorted(labels[idx]) == [0, 1, 2, 3, 4]
    idx2, diag2 = diversity.select_diverse(emb, 5 / 80, draw=0, seed=0)
    np.testing.assert_array_equal(idx, idx2)
    assert diag2 == diag
    idx3, diag3 = diversity.select_diverse(emb, 5 / 80, draw=1, seed=0)
    assert diag3["umap_random_state"] != diag["umap_random_state"]
    assert sorted(labels[idx3]) == [0, 1, 2, 3, 4]
    assert diag["reducer"] == "umap" and diag["n_neighbors"] == 15 and diag["min_dist"] == 0.1
    for space in ("reduced", "embedding"):
        for subset in ("kept", "all"):
            assert diag[f"mean_nn_distance_{subset}_{space}"] > 0
            assert diag[f"variance_{subset}_{space}"] > 0
    assert diag["mean_nn_distance_kept_reduced"] > diag["mean_nn_distance_all_reduced"]


def test_diverse_bad_input_is_user_error():
    with pytest.raises(UserError, match="reducer"):
        diversity.select_diverse(np.zeros((10, 2), np.float32), 0.5, reducer="pca")
    with pytest.raises(UserError, match="shape"):
        diversity.select_diverse(np.zeros(10, np.float32), 0.5)
    with pytest.raises(UserError, match="NaN"):
        diversity.select_diverse(np.full((10, 2), np.nan, np.float32), 0.5, reducer="none")


def test_embed_pixels_resizes_and_scales():
    rng = np.random.default_rng(0)
    stim = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    emb = diversity.embed_pixels(stim, size=16)  # already 16 px: no resize, exact /255
    assert emb.shape == (3, 16 * 16 * 3) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, stim.reshape(3, -1).astype(np.float32) / np.float32(255))
    flat = np.zeros((2, 20, 30, 3), np.uint8)
    flat[0] = (10, 128, 250)
    flat[1, :, 15:] = 255  # left half black, right half white
    emb = diversity.embed_pixels(flat, size=8)
    assert emb.shape == (2, 8 * 8 * 3)
    np.testing.assert_allclose(emb[0].reshape(8, 8, 3), np.broadcast_to(np.array([10, 128, 250]) / 255, (8, 8, 3)),
                               atol=1e-6)
    img = emb[1].reshape(8, 8, 3)
    assert np.all(img[:, :3] == 0) and np.all(img[:, 5:] == 1)
    expected = np.asarray(Image.fromarray(flat[1]).resize((8, 8), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(img, expected, atol=1e-7)
    with pytest.raises(UserError, match="uint8"):
        diversity.embed_pixels(stim.astype(np.float32))


def test_embed_clipvision_takes_the_class_token():
    feats = np.random.default_rng(0).normal(size=(4, 257, 6)).astype(np.float32)
    emb = diversity.embed_clipvision(feats)
    assert emb.shape == (4, 6) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, feats[:, 0])
    with pytest.raises(UserError, match="257"):
        diversity.embed_clipvision(feats[:, 0])


def test_embed_dreamsim_without_package_or_weights_says_how_to_enable(tmp_path):
    stim = np.zeros((2, 8, 8, 3), np.uint8)
    expected = "lacks" if importlib.util.find_spec("dreamsim") else "pip install dreamsim"
    with pytest.raises(UserError, match=expected):
        diversity.embed_dreamsim(stim, tmp_path, "cpu")


# ---------------------------------------------------------------------------------------------
# plain / heterogeneous backgrounds


def test_dominant_colour_counts_match_a_hand_count():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:5] = (12, 200, 255)  # 50 px in bin (1, 20, 25)
    img[5:7] = (19, 209, 250)  # 20 px, same bin -> 70
    img[7:9] = (20, 200, 255)  # 20 px: red 20 is bin 2, a different colour
    img[9] = (9, 200, 255)  # 10 px: red 9 is bin 0
    other = np.zeros((10, 10, 3), np.uint8)
    other[:, :3] = (100, 100, 100)  # 30 px
    other[:, 3:] = 110 + 2 * np.arange(70, dtype=np.uint8).reshape(10, 7, 1)  # 70 grey px, 110..248: 5 per bin
    counts = dominant_colour_counts(np.stack([img, other]), size=10)
    np.testing.assert_array_equal(counts, [70, 30])
    assert counts.dtype == np.int64
    # resized to 100x100 by default: a one-colour image is one bin of 10 000 pixels
    assert dominant_colour_counts(np.full((1, 37, 53, 3), 77, np.uint8)).tolist() == [10000]
    # bin_width 1 distinguishes every value
    assert dominant_colour_counts(np.stack([img]), size=10, bin_width=1).tolist() == [50]


def test_select_plain_separates_flat_from_noisy_images():
    rng = np.random.default_rng(0)
    n = 16
    flat_ids = np.array([0, 3, 4, 7, 9, 10, 13, 15])
    stim = rng.integers(0, 256, size=(n, 120, 90, 3), dtype=np.uint8)
    for j, i in enumerate(flat_ids):  # a plain background, a small noisy object, a little sensor noise
        stim[i] = np.clip(rng.normal(30 * j + 15, 1.0, size=(120, 90, 3)), 0, 255).astype(np.uint8)
        stim[i, 40:60, 30:50] = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    noisy_ids = np.setdiff1d(np.arange(n), flat_ids)
    np.testing.assert_array_equal(select_plain(stim, "monotone", 0.5), flat_ids)
    np.testing.assert_array_equal(select_plain(stim, "heterogeneous", 0.5), noisy_ids)
    mono = select_plain(stim, "monotone", 0.25)
    _check_indices(mono, n, 4)
    assert set(mono) <= set(flat_ids)
    assert set(select_plain(stim, "heterogeneous", 0.25)) <= set(noisy_ids)
    with pytest.raises(UserError, match="subset"):
        select_plain(stim, "boring", 0.25)


def test_ties_are_broken_by_index_and_subsets_stay_disjoint():
    np.testing.assert_array_equal(plainness_ranking([5, 9, 5, 9, 1]), [1, 3, 0, 2, 4])
    stim = np.zeros((6, 10, 10, 3), np.uint8)  # all equally plain
    np.testing.assert_array_equal(select_plain(stim, "monotone", 0.5), [0, 1, 2])
    np.testing.assert_array_equal(select_plain(stim, "heterogeneous", 0.5), [3, 4, 5])
