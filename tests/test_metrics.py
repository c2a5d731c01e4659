"""Image metrics, evaluation networks and decoder metrics against independent computations.

Tiny random networks (the real torchvision architectures, a small open_clip CLIP) on 8 small
images cut from scikit-image's photos; no weights are downloaded.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.distance import correlation as scipy_correlation
from scipy.stats import pearsonr
from skimage import data
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from evaluation import decoder_metrics as dm
from evaluation.metrics import (
    METRICS,
    compute_metrics,
    correlation_distance,
    correlation_matrix,
    extract_features,
    identification_p_value,
    ssim,
    two_way_identification,
)
from models.eval_networks import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHT_FILES,
    dreamsim_available,
    load_eval_network,
    load_eval_networks,
    missing_weight_files,
)
from pipeline.errors import UserError

N = 8
GT_SIZE = 80
RECON_SIZE = 96


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gts() -> np.ndarray:
    """(8, 80, 80, 3) uint8: two crops from each of four photos."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for photo in photos:
        h, w = photo.shape[:2]
        for y, x in [(0, 0), (h // 3, w // 3)]:
            crop = Image.fromarray(photo[y : y + 2 * h // 3, x : x + 2 * h // 3])
            out.append(np.asarray(crop.resize((GT_SIZE, GT_SIZE), Image.Resampling.BILINEAR)))
    return np.stack(out)


@pytest.fixture(scope="module")
def recons(gts) -> list[Image.Image]:
    """Noisy 96 px versions of the GTs (the last one pure noise), as PIL images."""
    rng = np.random.default_rng(0)
    out = []
    for k, g in enumerate(gts):
        big = np.asarray(Image.fromarray(g).resize((RECON_SIZE, RECON_SIZE), Image.Resampling.BILINEAR), dtype=float)
        noisy = big + rng.normal(0, 40, big.shape) if k < N - 1 else rng.uniform(0, 255, big.shape)
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def nets():
    return load_eval_networks(None, "cpu", tiny=True)


@pytest.fixture(scope="module")
def gt_feats(gts, nets):
    return extract_features(gts, nets, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def bd_result(recons, gts, nets, gt_feats):
    """All networks, GT features precomputed (each network runs once per image set: CPU time is scarce)."""
    return compute_metrics(recons, gts, nets, profile="braindiffuser", batch_size=4, gt_features=gt_feats,
                           return_features=True, progress=False)


# ------------------------------------------------------------------------------------ helpers


def ssim_columnwise_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over pixel columns of 1-D Gaussian SSIM (11 taps, sigma 1.5, border of 5 cropped)."""

    def f(z):
        return gaussian_filter1d(z, 1.5, axis=0, truncate=3.5, mode="reflect")

    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[5:-5].mean())


def identification_loop(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Brain-Diffuser's definition written out: for recon j, count GT i with r(G_i, R_j) < r(G_j, R_j)."""
    n = len(gt)
    out = np.zeros(n)
    for j in range(n):
        own = np.corrcoef(gt[j], rec[j])[0, 1]
        out[j] = sum(np.corrcoef(gt[i], rec[j])[0, 1] < own for i in range(n) if i != j) / (n - 1)
    return out


def normalise(x: np.ndarray, mean, std) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (1, 3, H, W) normalised tensor."""
    t = (x - np.array(mean)) / np.array(std)
    return torch.from_numpy(t.transpose(2, 0, 1)).float()[None]


# ------------------------------------------------------------------------------------ Brain-Diffuser profile


def test_result_records_profile_and_all_metrics(bd_result):
    assert bd_result["profile"] == "braindiffuser"
    assert bd_result["settings"]["name"] == "braindiffuser"
    assert bd_result["settings"]["ssim_variant"] == "columnwise"
    assert bd_result["n_images"] == N
    for m in METRICS:
        assert np.isfinite(bd_result[m]), m
        assert bd_result["per_image"][m].shape == (N,)
        assert bd_result[m] == pytest.approx(bd_result["per_image"][m].mean())
    assert set(bd_result["identification_p"]) == {"AlexNet(2)", "AlexNet(5)", "Inception", "CLIP"}
    assert bd_result["settings"]["weights"]["alexnet"] == "random(seed=0)"
    assert bd_result["settings"]["dtypes"]["clip"] == "float32"


def test_pixcorr_and_ssim_braindiffuser_by_hand(bd_result, recons, gts):
    for i in range(N):
        r = np.asarray(recons[i].resize((GT_SIZE, GT_SIZE), Image.Resampling.BICUBIC)) / 255.0
        g = gts[i] / 255.0
        assert bd_result["per_image"]["PixCorr"][i] == pytest.approx(pearsonr(r.ravel(), g.ravel())[0], abs=1e-12)
        rg, gg = rgb2gray(r), rgb2gray(g)
        assert bd_result["per_image"]["SSIM"][i] == pytest.approx(ssim_columnwise_by_hand(rg, gg), abs=1e-10)
        expected_skimage = structural_similarity(
            rg, gg, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert bd_result["per_image"]["SSIM"][i] == pytest.approx(expected_skimage, abs=1e-12)
    # the noise recon scores far below the noisy copies
    assert bd_result["per_image"]["PixCorr"][-1] < 0.2 < bd_result["per_image"]["PixCorr"][:-1].min()


def test_ssim_2d_variant_is_true_2d(gts):
    a, b = rgb2gray(gts[0] / 255.0), rgb2gray(gts[1] / 255.0)
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ssim(a, b, "2d") == pytest.approx(want, abs=1e-12)
    assert ssim(a, b, "2d") != pytest.approx(ssim(a, b, "columnwise"), abs=1e-3)
    with pytest.raises(UserError):
        ssim(a, b, "3d")


def test_network_metrics_match_features_scored_by_hand(bd_result, recons, gts, nets, gt_feats):
    gt_f, rec_f = bd_result["features"]["gt"], bd_result["features"]["recon"]
    assert gt_f is not None and all(gt_f[m] is gt_feats[m] for m in gt_feats)
    assert rec_f["AlexNet(2)"].shape == (N, 192 * 27 * 27) and rec_f["CLIP"].shape == (N, 32)
    for m in ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP"):
        np.testing.assert_allclose(bd_result["per_image"][m], identification_loop(gt_f[m], rec_f[m]), atol=1e-12)
    for m in ("EffNet-B", "SwAV"):
        want = [scipy_correlation(gt_f[m][i].astype(np.float64), rec_f[m][i].astype(np.float64)) for i in range(N)]
        np.testing.assert_allclose(bd_result["per_image"][m], want, atol=1e-9)


def test_braindiffuser_network_inputs_by_hand(gts, nets):
    """resize((224, 224)) bilinear on the PIL image, to_tensor, ImageNet or CLIP mean/std, then the hooked layer."""
    feats = extract_features(gts[:2], {"alexnet": nets["alexnet"], "clip": nets["clip"]}, progress=False)
    for i in range(2):
        x = np.asarray(Image.fromarray(gts[i]).resize((224, 224), Image.Resampling.BILINEAR)) / 255.0
        with torch.no_grad():
            a2 = nets["alexnet"].backbone.features[:5](normalise(x, IMAGENET_MEAN, IMAGENET_STD))
            a5 = nets["alexnet"].backbone.features[:12](normalise(x, IMAGENET_MEAN, IMAGENET_STD))
            c = nets["clip"].backbone(normalise(x, CLIP_MEAN, CLIP_STD))
        np.testing.assert_allclose(feats["AlexNet(2)"][i], a2.flatten().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats["AlexNet(5)"][i], a5.flatten().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats["CLIP"][i], c.flatten().numpy(), rtol=1e-4, atol=1e-5)


def test_identical_images_score_perfectly(gts, nets, gt_feats):
    sub = {"alexnet": nets["alexnet"], "clip": nets["clip"]}
    res = compute_metrics(gts, list(map(Image.fromarray, gts)), sub, batch_size=4, progress=False)
    assert res["PixCorr"] == pytest.approx(1.0) and res["SSIM"] == pytest.approx(1.0)
    for m in ("AlexNet(2)", "AlexNet(5)", "CLIP"):
        assert res[m] == 1.0, m
        assert res["identification_p"][m] < 1e-10
    # the same features (computed apart) for every network: perfect identification, zero distance
    for m in ("Inception", "CLIP", "AlexNet(2)"):
        assert two_way_identification(gt_feats[m], gt_feats[m]).mean() == 1.0
    for m in ("EffNet-B", "SwAV"):
        assert correlation_distance(gt_feats[m], gt_feats[m]) == pytest.approx(0.0, abs=1e-6)


def test_images_from_paths(tmp_path, gts, recons, bd_result):
    paths = []
    for i, im in enumerate(recons):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append(p)
    res = compute_metrics(paths, gts, {}, progress=False)
    np.testing.assert_allclose(res["per_image"]["PixCorr"], bd_result["per_image"]["PixCorr"], atol=1e-12)
    assert "AlexNet(2)" not in res


# ------------------------------------------------------------------------------------ MindEye profile


def test_mindeye_profile_by_hand(recons, gts, nets):
    import torchvision.transforms.functional as TF

    sub = {"alexnet": nets["alexnet"]}
    res = compute_metrics(recons, gts, sub, profile="mindeye", batch_size=4, progress=False)
    assert res["profile"] == "mindeye" and res["settings"]["ssim_variant"] == "2d"
    assert res["settings"]["effnet_weights"] == "IMAGENET1K_V2"

    def base(im):
        return TF.resize(TF.to_tensor(im), [256, 256], antialias=True)

    def pixels(im):
        return TF.resize(base(im), [425], antialias=True).permute(1, 2, 0).numpy().astype(np.float64)

    for i in (0, 3):
        r, g = pixels(recons[i]), pixels(Image.fromarray(gts[i]))
        assert r.shape == (425, 425, 3)
        assert res["per_image"]["PixCorr"][i] == pytest.approx(pearsonr(r.ravel(), g.ravel())[0], abs=1e-9)
        want = structural_similarity(rgb2gray(r), rgb2gray(g), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
        assert res["per_image"]["SSIM"][i] == pytest.approx(want, abs=1e-9)
    feats = extract_features(gts[:1], sub, profile="mindeye", progress=False)
    x = TF.normalize(TF.resize(base(Image.fromarray(gts[0])), [256], antialias=True), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        want = nets["alexnet"].backbone.features[:5](x[None]).flatten().numpy()
    assert feats["AlexNet(2)"].shape == (1, 192 * 31 * 31)  # AlexNet at MindEye's 256 px input
    np.testing.assert_allclose(feats["AlexNet(2)"][0], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ statistics


def test_identification_vectorised_equals_loop_with_ties():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(12, 30))
    rec = gt + rng.normal(scale=2.0, size=gt.shape)
    gt[5] = gt[4]  # a duplicated GT: r(G5, R4) == r(G4, R4), a tie that must count as a loss
    rec[7] = rec[6]
    np.testing.assert_allclose(correlation_matrix(gt, rec, chunk=5), np.corrcoef(gt, rec)[:12, 12:], atol=1e-12)
    got = two_way_identification(gt, rec)
    np.testing.assert_allclose(got, identification_loop(gt, rec), atol=0)
    # a recon whose every distractor ties can never win
    same = np.tile(gt[:1], (3, 1))
    assert np.all(two_way_identification(same, same) == 0.0)
    fresh = rng.normal(size=(12, 30))
    assert np.all(two_way_identification(fresh, fresh) == 1.0)
    assert identification_p_value(np.full(12, 0.5)) == pytest.approx(0.5, abs=0.05)


def test_correlation_distance_equals_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))
    b[0] = a[0]
    b[1] = -a[1]
    want = [scipy_correlation(a[i], b[i]) for i in range(6)]
    np.testing.assert_allclose(correlation_distance(a, b), want, atol=1e-12)


# ------------------------------------------------------------------------------------ networks


def test_tiny_network_feature_shapes(nets, gt_feats):
    """Shapes at the 224 px input every network gets under the Brain-Diffuser profile."""
    shapes = {m: f.shape for m, f in gt_feats.items()}
    assert shapes == {
        "AlexNet(2)": (N, 192 * 27 * 27),
        "AlexNet(5)": (N, 256 * 13 * 13),
        "Inception": (N, 2048),
        "CLIP": (N, 32),  # the tiny CLIP; ViT-L/14 gives 768 (next test)
        "EffNet-B": (N, 1280),
        "SwAV": (N, 2048),
    }
    assert all(f.dtype == np.float32 for f in gt_feats.values())
    assert nets["inception"].backbone.transform_input is True
    assert all(not p.requires_grad for net in nets.values() for p in net.parameters())


def test_real_clip_architecture_gives_768_with_quickgelu():
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True, device="meta")
        out = model.visual(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 768)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_tiny_networks_are_seeded():
    a = load_eval_network("effnet", None, tiny=True, seed=3)
    b = load_eval_network("effnet", None, tiny=True, seed=3)
    c = load_eval_network("effnet", None, tiny=True, seed=4)
    pa, pb, pc = (next(n.parameters()) for n in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"alexnet-owt-7be5be79\.pth.*make weights"):
        load_eval_networks(tmp_path, "cpu", names=["alexnet", "swav"])
    assert missing_weight_files(tmp_path, ["effnet"], "mindeye") == ["efficientnet_b1-c27df63c.pth"]
    assert missing_weight_files(tmp_path) == [WEIGHT_FILES[n].filename for n in ("alexnet", "inception", "clip", "effnet", "swav")]
    with pytest.raises(UserError, match="make weights"):
        load_eval_network("clip", tmp_path)
    with pytest.raises(UserError, match="unknown evaluation network"):
        load_eval_networks(None, tiny=True, names=["vgg"])
    with pytest.raises(UserError, match="unknown evaluation profile"):
        load_eval_networks(None, tiny=True, names=["alexnet"], profile="takagi")


def test_weight_files_load_and_profile_mismatch_is_caught(tmp_path, gts):
    import torchvision.models as tvm

    torch.manual_seed(0)
    eff = tvm.efficientnet_b1()
    torch.save(eff.state_dict(), tmp_path / WEIGHT_FILES["effnet"].filename)
    net = load_eval_network("effnet", tmp_path)
    assert net.weights == WEIGHT_FILES["effnet"].filename and not net.tiny
    assert torch.equal(net.backbone.features[0][0].weight, eff.features[0][0].weight)
    with pytest.raises(UserError, match="IMAGENET1K_V2"):
        compute_metrics(gts[:2], gts[:2], {"effnet": net}, profile="mindeye", progress=False)

    # SwAV: DataParallel prefix, extra heads, no fc -> loads; fc stays random
    res = tvm.resnet50()
    state = {f"module.{k}": v for k, v in res.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(3, 3)
    state["module.prototypes.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / WEIGHT_FILES["swav"].filename)
    swav = load_eval_network("swav", tmp_path)
    assert torch.equal(swav.backbone.conv1.weight, res.conv1.weight)

    # a file of the wrong architecture
    torch.save({"weight": torch.zeros(2)}, tmp_path / WEIGHT_FILES["alexnet"].filename)
    with pytest.raises(UserError, match="alexnet"):
        load_eval_network("alexnet", tmp_path)


def test_dreamsim_hook_reports_clearly(tmp_path):
    ok, why = dreamsim_available(tmp_path)
    if ok:
        pytest.skip("dreamsim installed and its weights present")
    assert why
    with pytest.raises(UserError, match="DreamSim"):
        load_eval_networks(tmp_path, names=["dreamsim"])


def test_bad_inputs_are_user_errors(gts):
    with pytest.raises(UserError, match="uint8"):
        compute_metrics(gts.astype(np.float32), gts, {}, progress=False)
    with pytest.raises(UserError, match="differ in number"):
        compute_metrics(gts[:3], gts[:4], {}, progress=False)
    with pytest.raises(UserError, match="not found"):
        compute_metrics(["/nonexistent/0.png", "/nonexistent/1.png"], gts[:2], {}, progress=False)
    with pytest.raises(UserError, match="profile"):
        compute_metrics(gts[:2], gts[:2], {}, profile="nope", progress=False)


# ------------------------------------------------------------------------------------ decoder metrics


def test_decoder_metrics_by_hand_and_against_bdpy():
    from bdpy.evals import metrics as bdm

    rng = np.random.default_rng(3)
    true = rng.normal(size=(10, 4, 5))  # (N, ...) is flattened to (N, 20)
    pred = true + rng.normal(scale=1.5, size=true.shape)
    t2, p2 = true.reshape(10, -1), pred.reshape(10, -1)

    prof = dm.profile_correlation(pred, true, chunk=7)
    np.testing.assert_allclose(prof, [pearsonr(p2[:, d], t2[:, d])[0] for d in range(20)], atol=1e-12)
    np.testing.assert_allclose(prof, bdm.profile_correlation(p2, t2).ravel(), atol=1e-12)

    mean, std = rng.normal(size=20), rng.uniform(0.5, 2, size=20)
    patt = dm.pattern_correlation(pred, true, mean, std)
    want = [pearsonr((p2[i] - mean) / std, (t2[i] - mean) / std)[0] for i in range(10)]
    np.testing.assert_allclose(patt, want, atol=1e-12)
    np.testing.assert_allclose(dm.pattern_correlation(pred, true), [pearsonr(p2[i], t2[i])[0] for i in range(10)], atol=1e-12)

    t2[3] = t2[2]  # a tie: for prediction 2, candidate 3 correlates exactly as its own target
    ident = dm.pairwise_identification(p2, t2)
    by_hand = [
        sum(np.corrcoef(p2[i], t2[j])[0, 1] < np.corrcoef(p2[i], t2[i])[0, 1] for j in range(10) if j != i) / 9
        for i in range(10)
    ]
    np.testing.assert_allclose(ident, by_hand, atol=0)
    np.testing.assert_allclose(ident, bdm.pairwise_identification(p2, t2), atol=0)

    res = dm.evaluate_decoder(p2, t2, mean, std)
    assert res["identification_accuracy"] == pytest.approx(np.mean(by_hand))
    assert res["n_samples"] == 10 and res["n_features"] == 20 and res["pattern_normalised"]
    with pytest.raises(UserError):
        dm.evaluate_decoder(p2, t2[:5])
    with pytest.raises(UserError, match="both"):
        dm.pattern_correlation(p2, t2, mean, None)


def test_shuffled_sets_score_chance():
    """Recons matched to the wrong ground truth (a derangement) score about 50% identification."""
    from evaluation.metrics import two_way_identification

    rng = np.random.default_rng(0)
    gt = rng.normal(size=(60, 200))
    perm = np.roll(np.arange(60), 1)
    scores = [two_way_identification(gt, gt[perm] + rng.normal(scale=0.5, size=gt.shape)).mean() for _ in range(5)]
    assert abs(np.mean(scores) - 0.5) < 0.05
    assert two_way_identification(gt, gt + rng.normal(scale=0.5, size=gt.shape)).mean() > 0.99
