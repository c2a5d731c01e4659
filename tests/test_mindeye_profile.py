"""evaluation.metrics' MindEye profile against an independent computation written from MindEye2's
published evaluation notebook (``MedARC-AI/MindEyeV2`` ``src/final_evaluations.ipynb``), on fixed arrays.

Their conventions, as the notebook applies them to float tensors in [0, 1]:
* every GT and recon batch first goes through ``transforms.Resize((256, 256))`` (bilinear);
* PixCorr: ``Resize(425)`` bilinear, flatten each image, ``np.corrcoef`` per pair, mean;
* SSIM: ``Resize(425)``, ``rgb2gray`` on NHWC, ``structural_similarity(rec, gt, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1.0)`` on the 2-D gray images (scikit-image 0.22,
  their pin, no longer knows ``multichannel`` and computes 2-D SSIM);
* AlexNet: ``create_feature_extractor(alexnet, ['features.4', 'features.11'])`` after ``Resize(256)`` +
  ImageNet normalisation; Inception ``avgpool`` after ``Resize(342)``; CLIP ``encode_image`` after
  ``Resize(224)`` + CLIP normalisation; EffNet-B1 ``avgpool`` after ``Resize(255)``; SwAV ``avgpool``
  after ``Resize(224)``;
* two-way identification: ``r = np.corrcoef(reals, preds)[:N, N:]``; ``success = r < diag(r)``
  (broadcast over columns); per recon the count over GT rows; mean count / (N − 1);
* EffNet-B / SwAV: mean of ``scipy.spatial.distance.correlation(gt_i, fake_i)``.

Resizes are antialiased: the notebook's saved outputs show none of the antialias warnings torchvision
0.15-0.16 emits for tensor resizes (while other warnings are shown), i.e. it ran with the >= 0.17
default ``antialias=True`` (its ``setup.sh`` names torchvision 0.16.0; see the closing note of issue 16).
The networks are the project's tiny random ones (real torchvision architectures); the independent part
is the preprocessing, the layer read-out (torchvision's feature extractor, not the project's hooks) and
the statistics.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torchvision.transforms as T
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.models.feature_extraction import create_feature_extractor

from evaluation.metrics import compute_metrics
from models.eval_networks import load_eval_networks
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 8
IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
CLIP = dict(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])


def _fixed_images():
    """GT 120 px (like NSD's 425, smaller) and recon 160 px (like VD's 512): smooth fields + noise."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:120, 0:120] / 120.0
    gts = []
    for k in range(N):
        f = [np.sin((k + 1) * 3 * xx + c) * np.cos((k + 2) * 2 * yy - c) for c in range(3)]
        gts.append(np.clip((np.stack(f, -1) * 0.4 + 0.5) * 255 + rng.normal(0, 8, (120, 120, 3)), 0, 255))
    gts = np.stack(gts).astype(np.uint8)
    recons = []
    for k, g in enumerate(gts):
        big = np.asarray(Image.fromarray(g).resize((160, 160), Image.Resampling.BICUBIC), dtype=float)
        noisy = big + rng.normal(0, 110, big.shape) if k < N - 1 else rng.uniform(0, 255, big.shape)
        recons.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return gts, np.stack(recons)


def _batch(uint8):  # (N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1], as their all_images / all_recons
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255.0


def _two_way(all_recons, all_images, model, preprocess, layer):
    with torch.no_grad():
        preds = model(preprocess(all_recons))
        reals = model(preprocess(all_images))
    if layer is not None:
        preds, reals = preds[layer], reals[layer]
    preds = preds.float().flatten(1).numpy()
    reals = reals.float().flatten(1).numpy()
    r = np.corrcoef(reals, preds)[: len(all_images), len(all_images):]
    success = r < np.diag(r)
    return np.mean(np.sum(success, 0)) / (len(all_images) - 1)


def mindeye2_metrics(gt_uint8, recon_uint8, nets) -> dict[str, float]:
    all_images = T.Resize((256, 256), antialias=True)(_batch(gt_uint8))
    all_recons = T.Resize((256, 256), antialias=True)(_batch(recon_uint8))
    out = {}
    to425 = T.Resize(425, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    gi, ri = to425(all_images).reshape(len(all_images), -1), to425(all_recons).reshape(len(all_recons), -1)
    out["PixCorr"] = float(np.mean([np.corrcoef(gi[i], ri[i])[0][1] for i in range(len(gi))]))
    img_gray = rgb2gray(to425(all_images).permute(0, 2, 3, 1).numpy())
    rec_gray = rgb2gray(to425(all_recons).permute(0, 2, 3, 1).numpy())
    out["SSIM"] = float(np.mean([structural_similarity(rec, im, gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, data_range=1.0)
                                 for im, rec in zip(img_gray, rec_gray)]))

    def prep(size, norm):
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                          T.Normalize(**norm)])

    alex = create_feature_extractor(nets["alexnet"].backbone, return_nodes=["features.4", "features.11"]).eval()
    out["AlexNet(2)"] = _two_way(all_recons, all_images, alex, prep(256, IMAGENET), "features.4")
    out["AlexNet(5)"] = _two_way(all_recons, all_images, alex, prep(256, IMAGENET), "features.11")
    inc = create_feature_extractor(nets["inception"].backbone, return_nodes=["avgpool"]).eval()
    out["Inception"] = _two_way(all_recons, all_images, inc, prep(342, IMAGENET), "avgpool")
    out["CLIP"] = _two_way(all_recons, all_images, nets["clip"].backbone, prep(224, CLIP), None)
    for name, size, key in (("effnet", 255, "EffNet-B"), ("swav", 224, "SwAV")):
        model = create_feature_extractor(nets[name].backbone, return_nodes=["avgpool"]).eval()
        with torch.no_grad():
            gt = model(prep(size, IMAGENET)(all_images))["avgpool"].reshape(len(all_images), -1).numpy()
            fake = model(prep(size, IMAGENET)(all_recons))["avgpool"].reshape(len(all_recons), -1).numpy()
        # float64: the tiny random EffNet's avgpool features are ~1e-13, whose float32 products underflow
        # (real networks' features are O(1), where float32 and float64 agree)
        gt, fake = gt.astype(np.float64), fake.astype(np.float64)
        out[key] = float(np.mean([scipy.spatial.distance.correlation(gt[i], fake[i]) for i in range(len(gt))]))
    return out


@pytest.fixture(scope="module")
def nets():
    return load_eval_networks(None, "cpu", tiny=True, profile="mindeye")


def test_mindeye_profile_equals_mindeye2_notebook_conventions(nets):
    gts, recons = _fixed_images()
    got = compute_metrics(list(map(Image.fromarray, recons)), gts, nets, profile="mindeye", batch_size=4,
                          progress=False)
    want = mindeye2_metrics(gts, recons, nets)
    assert got["profile"] == "mindeye"
    for metric, value in want.items():
        tol = 1e-9 if metric in ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP") else 2e-5
        assert got[metric] == pytest.approx(value, abs=tol), metric
    # the fixed arrays are not degenerate: recons 0-4 resemble their GT, the last is noise
    assert 0.3 < want["PixCorr"] < 0.99 and want["SSIM"] > 0.05
    # the profile differs measurably from Brain-Diffuser's on the same arrays (resolution path, 2-D SSIM)
    bd = compute_metrics(list(map(Image.fromarray, recons)), gts, {}, profile="braindiffuser", progress=False)
    assert abs(bd["SSIM"] - want["SSIM"]) > 1e-3 and abs(bd["PixCorr"] - want["PixCorr"]) > 1e-4


def test_wrong_profile_name_is_a_one_line_error():
    gts, recons = _fixed_images()
    with pytest.raises(UserError, match="unknown evaluation profile 'mind-eye'") as e:
        compute_metrics(list(recons), gts, {}, profile="mind-eye", progress=False)
    assert "\n" not in str(e.value)
