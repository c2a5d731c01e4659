"""The eight image-reconstruction metrics (PixCorr, SSIM, AlexNet(2), AlexNet(5), Inception, CLIP,
EffNet-B, SwAV) under two conventions, and the optional DreamSim distance.

``profile="braindiffuser"`` (default; ``method.md`` §6) scores what Brain-Diffuser's
``eval_extract_features.py`` + ``evaluate_reconstruction.py`` score:

* PixCorr/SSIM: the recon is resized to the GT's own size with PIL bicubic, both are divided by 255.
  PixCorr = Pearson r of the flattened RGB arrays, per image, averaged. SSIM = ``rgb2gray`` on both,
  then scikit-image's Gaussian SSIM (sigma 1.5, population covariance, data range 1) in the variant
  scikit-image 0.17 computed for Brain-Diffuser's call: ``multichannel=True`` on a 2-D gray image
  meant one 1-D SSIM per pixel column, averaged (``channel_axis=-1`` reproduces it today).
* Networks: every image -> torchvision ``resize((224, 224))`` on the PIL image (bilinear, no crop)
  -> ``to_tensor`` -> CLIP or ImageNet mean/std. CLIP in float32, EfficientNet-B1 IMAGENET1K_V1.

``profile="mindeye"`` (``prior-art.md`` §2; MindEye2's ``final_evaluations.ipynb``, scikit-image 0.22;
its ``setup.sh`` names torchvision 0.16.0, but the notebook's saved outputs carry none of the
antialias warnings 0.15-0.16 print for tensor resizes, so it ran with the >= 0.17 default;
checked against an independent re-computation in ``tests/test_mindeye_profile.py``):

* every image -> float tensor in [0, 1] -> ``Resize((256, 256))`` bilinear (antialiased, the
  torchvision >= 0.17 default), then per use ``Resize(size)`` (shorter side, bilinear):
  425 for PixCorr/SSIM, 256 AlexNet, 342 Inception, 224 CLIP, 255 EffNet-B, 224 SwAV.
* SSIM is the true 2-D SSIM (scikit-image >= 0.20 ignores the ``multichannel`` flag MindEye passes).
* CLIP in float16 on CUDA (the ``clip`` package's default there), EfficientNet-B1 IMAGENET1K_V2.

Shared: two-way identification for AlexNet(2)/(5), Inception and CLIP with all N-1 distractors:
``r[i, j]`` = Pearson r of GT i and recon j features; recon j scores the fraction of GT images
``i != j`` with ``r[i, j] < r[j, j]`` (strict: ties are losses); the metric is the mean over recons
(chance 0.5). EffNet-B and SwAV: mean over images of the correlation distance ``1 - r(g_i, r_i)``.
The profile name is written into every result.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import binom
from tqdm.auto import tqdm

from models.eval_networks import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROFILES,
    DreamSimNetwork,
    EvalNetwork,
    weight_entry,
)
from pipeline.errors import UserError

#: Column order of the metrics table (Brain-Diffuser Table 1).
METRICS = ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "Inception", "CLIP", "EffNet-B", "SwAV")
HIGHER_IS_BETTER = {
    "PixCorr": True, "SSIM": True, "AlexNet(2)": True, "AlexNet(5)": True, "Inception": True,
    "CLIP": True, "EffNet-B": False, "SwAV": False, "DreamSim": False,
}
#: metric -> (network name, layer key of that network)
NETWORK_METRICS = {
    "AlexNet(2)": ("alexnet", "features.4"),
    "AlexNet(5)": ("alexnet", "features.11"),
    "Inception": ("inception", "avgpool"),
    "CLIP": ("clip", "embedding"),
    "EffNet-B": ("effnet", "avgpool"),
    "SwAV": ("swav", "avgpool"),
}
IDENTIFICATION_METRICS = ("AlexNet(2)", "AlexNet(5)", "Inception", "CLIP")
SSIM_VARIANTS = ("columnwise", "2d")
SSIM_KWARGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


@dataclass(frozen=True)
class ProfileSettings:
    """Everything that differs between the two metric conventions."""

    name: str
    common_size: int | None  # every image first resized to (s, s) (MindEye); None: untouched
    pixel_size: int | None  # PixCorr/SSIM resolution (shorter side); None: the GT's native size
    input_size: dict[str, int] = field(default_factory=dict)  # per network
    square_resize: bool = True  # True: resize to (s, s); False: shorter side to s (torchvision Resize(int))
    backend: str = "pil"  # "pil": resize PIL images (Brain-Diffuser); "tensor": resize float tensors (MindEye)
    antialias: bool = True  # tensor backend only
    ssim_variant: str = "columnwise"
    effnet_weights: str = "IMAGENET1K_V1"
    clip_dtype: str = "float32"  # "float16 on cuda" for MindEye


PROFILE_SETTINGS = {
    "braindiffuser": ProfileSettings(
        name="braindiffuser",
        common_size=None,
        pixel_size=None,
        input_size={n: 224 for n in ("alexnet", "inception", "clip", "effnet", "swav")},
        square_resize=True,
        backend="pil",
        ssim_variant="columnwise",
        effnet_weights="IMAGENET1K_V1",
        clip_dtype="float32",
    ),
    "mindeye": ProfileSettings(
        name="mindeye",
        common_size=256,
        pixel_size=425,
        input_size={"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224},
        square_resize=False,
        backend="tensor",
        antialias=True,
        ssim_variant="2d",
        effnet_weights="IMAGENET1K_V2",
        clip_dtype="float16 on cuda",
    ),
}


# --------------------------------------------------------------------------------------------
# Pure statistics (numpy)
# --------------------------------------------------------------------------------------------


def _row_stats(x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and centred L2 norm of x (N, D), in float64, chunk rows at a time."""
    means = np.empty(len(x))
    norms = np.empty(len(x))
    for s in range(0, len(x), chunk):
        block = np.asarray(x[s : s + chunk], dtype=np.float64)
        m = block.mean(axis=1)
        means[s : s + chunk] = m
        norms[s : s + chunk] = np.sqrt(((block - m[:, None]) ** 2).sum(axis=1))
    return means, norms


def correlation_matrix(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pearson r between every row of a (Na, D) and every row of b (Nb, D) -> (Na, Nb), float64.

    Equals ``np.corrcoef(a, b)[:Na, Na:]`` without materialising a float64 copy of both inputs.
    Rows with zero variance give NaN (as ``np.corrcoef``).
    """
    a = np.asarray(a).reshape(len(a), -1)
    b = np.asarray(b).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise UserError(f"feature sizes differ: {a.shape} vs {b.shape}")
    ma, na = _row_stats(a, chunk)
    mb, nb = _row_stats(b, chunk)
    out = np.empty((len(a), len(b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(0, len(a), chunk):
            za = (np.asarray(a[i : i + chunk], dtype=np.float64) - ma[i : i + chunk, None]) / na[i : i + chunk, None]
            for j in range(0, len(b), chunk):
                zb = (np.asarray(b[j : j + chunk], dtype=np.float64) - mb[j : j + chunk, None]) / nb[j : j + chunk, None]
                out[i : i + chunk, j : j + chunk] = za @ zb.T
    return out


def rowwise_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of row i of a with row i of b, for every i: (N, D), (N, D) -> (N,) float64."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise UserError(f"shapes differ: {a.shape} vs {b.shape}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def two_way_identification(gt_feats: np.ndarray, recon_feats: np.ndarray) -> np.ndarray:
    """Per-recon two-way identification with all N-1 distractors (Brain-Diffuser/MindEye).

    gt_feats, recon_feats: (N, D) -> (N,) where entry j = #{i != j : r(G_i, R_j) < r(G_j, R_j)} / (N-1).
    Ties and NaN correlations count as losses. The metric is the mean of the result.
    """
    n = len(gt_feats)
    if n < 2 or len(recon_feats) != n:
        raise UserError(f"two-way identification needs N >= 2 matched pairs, got {n} GT and {len(recon_feats)} recons")
    r = correlation_matrix(gt_feats, recon_feats)  # rows: GT, columns: recons
    congruent = np.diag(r)
    wins = (r < congruent[None, :]).sum(axis=0)  # the diagonal is never < itself
    return wins / (n - 1)


def identification_p_value(per_image: np.ndarray) -> float:
    """One-sided binomial p of the total number of wins over N(N-1) comparisons at chance 0.5."""
    n = len(per_image)
    trials = n * (n - 1)
    wins = int(round(float(np.sum(per_image)) * (n - 1)))
    return float(binom.sf(wins, trials, 0.5))  # = 1 - cdf(wins), as Brain-Diffuser prints it


def correlation_distance(gt_feats: np.ndarray, recon_feats: np.ndarray) -> np.ndarray:
    """scipy's ``correlation`` distance per image pair: (N, D), (N, D) -> (N,) = 1 - r, clipped to [0, 2]."""
    return np.clip(1.0 - rowwise_correlation(gt_feats, recon_feats), 0.0, 2.0)


def pixcorr(recon: np.ndarray, gt: np.ndarray) -> float:
    """Pearson r of two equally shaped images, flattened."""
    return float(rowwise_correlation(np.ravel(recon)[None], np.ravel(gt)[None])[0])


def ssim(recon_gray: np.ndarray, gt_gray: np.ndarray, variant: str = "columnwise") -> float:
    """Gaussian SSIM of two 2-D gray images in [0, 1] (sigma 1.5, population covariance).

    ``variant="columnwise"``: the mean of the 1-D SSIMs of the pixel columns (scikit-image <= 0.19
    with ``multichannel=True`` on a 2-D image, as Brain-Diffuser ran it); ``"2d"``: true 2-D SSIM.
    """
    from skimage.metrics import structural_similarity

    if variant not in SSIM_VARIANTS:
        raise UserError(f"unknown SSIM variant {variant!r}; expected one of {SSIM_VARIANTS}")
    if recon_gray.ndim != 2 or recon_gray.shape != gt_gray.shape:
        raise UserError(f"SSIM needs two equally shaped 2-D images, got {recon_gray.shape} and {gt_gray.shape}")
    extra = {"channel_axis": -1} if variant == "columnwise" else {}
    try:
        return float(structural_similarity(recon_gray, gt_gray, **SSIM_KWARGS, **extra))
    except ValueError as exc:  # image smaller than the 11-tap window
        raise UserError(f"SSIM cannot be computed on {gt_gray.shape} images: {exc}") from None


# --------------------------------------------------------------------------------------------
# Images in, preprocessing
# --------------------------------------------------------------------------------------------


class ImageSource:
    """Lazy access to N RGB images given as a uint8 array (N, H, W, 3) or a list of PIL images/paths."""

    def __init__(self, images, what: str):
        self.what = what
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise UserError(
                    f"{what}: expected a uint8 array of shape (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            self._items = images
        elif isinstance(images, (list, tuple)):
            for k, im in enumerate(images):
                if not isinstance(im, (Image.Image, str, os.PathLike)):
                    raise UserError(f"{what}[{k}]: expected a PIL image or a path, got {type(im).__name__}")
                if not isinstance(im, Image.Image) and not Path(im).is_file():
                    raise UserError(f"{im}: image file not found ({what}[{k}])")
            self._items = list(images)
        else:
            raise UserError(
                f"{what}: expected a uint8 array (N, H, W, 3) or a list of PIL images/paths, got {type(images).__name__}"
            )

    def __len__(self) -> int:
        return len(self._items)

    def pil(self, i: int) -> Image.Image:
        item = self._items[i]
        if isinstance(item, np.ndarray):
            return Image.fromarray(item).convert("RGB")
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        try:
            with Image.open(item) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt file (PIL raises these)
            raise UserError(f"{item}: not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                            "delete it and rerun the step that wrote it") from None


def _normalise(x: torch.Tensor, normalisation: str) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    mean, std = (CLIP_MEAN, CLIP_STD) if normalisation == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return TF.normalize(x, mean=list(mean), std=list(std))


class _Preprocessor:
    """Turns a batch of PIL images into pixel arrays and network inputs under one profile."""

    def __init__(self, settings: ProfileSettings):
        self.s = settings

    def _size(self, size: int) -> list[int]:
        return [size, size] if self.s.square_resize else [size]

    def base(self, pils: list[Image.Image]):
        """Per-batch starting point: PIL images (pil backend) or a float tensor (B, 3, s, s) in [0, 1]."""
        import torchvision.transforms.functional as TF

        if self.s.backend == "pil":
            return pils
        ts = []
        for im in pils:
            t = TF.to_tensor(im)
            if self.s.common_size is not None:
                t = TF.resize(t, [self.s.common_size, self.s.common_size],
                              interpolation=TF.InterpolationMode.BILINEAR, antialias=self.s.antialias)
            ts.append(t)
        return ts

    def network_input(self, base, net: EvalNetwork) -> torch.Tensor:
        """(B, 3, h, w) normalised input for ``net``."""
        import torchvision.transforms.functional as TF

        size = self._size(self.s.input_size[net.name])
        out = []
        for item in base:
            if self.s.backend == "pil":
                t = TF.to_tensor(TF.resize(item, size, interpolation=TF.InterpolationMode.BILINEAR))
            else:
                t = TF.resize(item, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=self.s.antialias)
            out.append(_normalise(t, net.normalisation))
        return torch.stack(out)

    def pixel_pair(self, recon_base, gt_base) -> tuple[np.ndarray, np.ndarray]:
        """(recon, gt) as float64 (H, W, 3) arrays in [0, 1] at the PixCorr/SSIM resolution."""
        import torchvision.transforms.functional as TF

        if self.s.backend == "pil":
            if recon_base.size != gt_base.size:
                recon_base = recon_base.resize(gt_base.size, Image.Resampling.BICUBIC)
            return np.asarray(recon_base, dtype=np.float64) / 255.0, np.asarray(gt_base, dtype=np.float64) / 255.0

        def to_hwc(t):
            t = TF.resize(t, [self.s.pixel_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=self.s.antialias)
            return t.permute(1, 2, 0).numpy().astype(np.float64)

        return to_hwc(recon_base), to_hwc(gt_base)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _check_networks(networks: dict, settings: ProfileSettings) -> None:
    for name, net in networks.items():
        if name == "dreamsim":
            if not isinstance(net, DreamSimNetwork):
                raise UserError(f"networks['dreamsim']: expected a DreamSimNetwork, got {type(net).__name__}")
            continue
        if not isinstance(net, EvalNetwork) or net.name != name:
            raise UserError(f"networks[{name!r}]: expected the EvalNetwork named {name!r} (see load_eval_networks)")
        if name == "effnet" and not net.tiny:
            want = weight_entry("effnet", settings.name).filename
            if net.weights != want:
                raise UserError(
                    f"profile {settings.name!r} scores EffNet-B with {settings.effnet_weights} ({want}) but the "
                    f"network was loaded from {net.weights}; load the networks with profile={settings.name!r}"
                )


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, unit="batch")


def extract_features(
    images,
    networks: dict,
    profile: str = "braindiffuser",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Features of every scored layer: {metric name: (N, D) float32}, for the networks given.

    Useful to compute the GT features once and pass them to several ``compute_metrics`` calls.
    """
    settings = _settings(profile)
    _check_networks(networks, settings)
    source = images if isinstance(images, ImageSource) else ImageSource(images, "images")
    prep = _Preprocessor(settings)
    nets = {k: v for k, v in networks.items() if isinstance(v, EvalNetwork)}
    chunks: dict[str, list[np.ndarray]] = {m: [] for m, (n, _) in NETWORK_METRICS.items() if n in nets}
    for s in _batches(len(source), batch_size, f"features ({source.what})", progress):
        base = prep.base([source.pil(i) for i in range(s, min(s + batch_size, len(source)))])
        _forward_all(prep, base, nets, chunks)
    return {m: np.concatenate(c) for m, c in chunks.items()}


def _forward_all(prep: _Preprocessor, base, nets: dict[str, EvalNetwork], chunks: dict[str, list]) -> None:
    for name, net in nets.items():
        feats = net(prep.network_input(base, net))
        for metric, (net_name, layer) in NETWORK_METRICS.items():
            if net_name == name:
                chunks[metric].append(feats[layer].cpu().numpy())


def compute_metrics(
    recons,
    gts,
    networks: dict,
    profile: str = "braindiffuser",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    ssim_variant: str | None = None,
    gt_features: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    return_features: bool = False,
) -> dict:
    """Score N reconstructions against their N ground-truth images (matched by position).

    recons, gts: uint8 arrays (N, H, W, 3) or lists of PIL images / image paths (sizes may differ).
    networks: from ``load_eval_networks`` (any subset; PixCorr and SSIM need none). ``device``, if
    given, must be where the networks are (they are not moved). ``ssim_variant`` overrides the
    profile's. ``gt_features`` (from ``extract_features`` on ``gts``) skips the GT network passes.
    ``return_features=True`` adds {"features": {"recon": {metric: (N, D)}, "gt": {...}}}.

    Returns {"profile", "n_images", one float per metric computed (``METRICS`` order, plus
    "DreamSim"), "per_image": {metric: (N,) array} (identification: the per-recon fraction of
    distractors beaten), "identification_p": {metric: binomial p}, "settings": {...}}.
    """
    settings = _settings(profile)
    variant = ssim_variant or settings.ssim_variant
    if variant not in SSIM_VARIANTS:
        raise UserError(f"unknown SSIM variant {variant!r}; expected one of {SSIM_VARIANTS}")
    _check_networks(networks, settings)
    rec_src = ImageSource(recons, "recons")
    gt_src = ImageSource(gts, "gts")
    n = len(gt_src)
    if len(rec_src) != n:
        raise UserError(f"recons and gts differ in number: {len(rec_src)} vs {n}")
    if n < 2:
        raise UserError(f"need at least 2 image pairs to score identification, got {n}")
    nets = {k: v for k, v in networks.items() if isinstance(v, EvalNetwork)}
    if device is not None:
        for name, net in nets.items():
            dev = torch.device(device)
            if net.device.type != dev.type or (dev.index is not None and net.device.index != dev.index):
                raise UserError(f"networks[{name!r}] is on {net.device}, not on the requested device {device}")
    metric_names = [m for m, (net_name, _) in NETWORK_METRICS.items() if net_name in nets]
    if gt_features is not None:
        for m in metric_names:
            if m not in gt_features or len(gt_features[m]) != n:
                raise UserError(f"gt_features[{m!r}]: missing or not {n} rows")
    dreamsim = networks.get("dreamsim")

    prep = _Preprocessor(settings)
    pix = np.empty(n)
    ssims = np.empty(n)
    dreamsim_d = np.empty(n) if dreamsim is not None else None
    rec_chunks: dict[str, list] = {m: [] for m in metric_names}
    gt_chunks: dict[str, list] = {m: [] for m in metric_names}
    from skimage.color import rgb2gray

    for s in _batches(n, batch_size, f"metrics ({settings.name})", progress):
        idx = range(s, min(s + batch_size, n))
        rec_pils = [rec_src.pil(i) for i in idx]
        gt_pils = [gt_src.pil(i) for i in idx]
        rec_base, gt_base = prep.base(rec_pils), prep.base(gt_pils)
        for k, i in enumerate(idx):
            r_img, g_img = prep.pixel_pair(rec_base[k], gt_base[k])
            pix[i] = pixcorr(r_img, g_img)
            ssims[i] = ssim(rgb2gray(r_img), rgb2gray(g_img), variant)
        _forward_all(prep, rec_base, nets, rec_chunks)
        if gt_features is None:
            _forward_all(prep, gt_base, nets, gt_chunks)
        if dreamsim is not None:
            dreamsim_d[s : s + len(idx)] = dreamsim.distance(rec_pils, gt_pils).numpy()

    per_image: dict[str, np.ndarray] = {"PixCorr": pix, "SSIM": ssims}
    result: dict = {"profile": settings.name, "n_images": n, "PixCorr": float(pix.mean()), "SSIM": float(ssims.mean())}
    p_values = {}
    features: dict[str, dict[str, np.ndarray]] = {"recon": {}, "gt": {}}
    for m in metric_names:
        rec_f = np.concatenate(rec_chunks[m])
        gt_f = gt_features[m] if gt_features is not None else np.concatenate(gt_chunks[m])
        features["recon"][m], features["gt"][m] = rec_f, gt_f
        if m in IDENTIFICATION_METRICS:
            per_image[m] = two_way_identification(gt_f, rec_f)
            p_values[m] = identification_p_value(per_image[m])
        else:
            per_image[m] = correlation_distance(gt_f, rec_f)
        result[m] = float(per_image[m].mean())
    if dreamsim is not None:
        per_image["DreamSim"] = dreamsim_d
        result["DreamSim"] = float(dreamsim_d.mean())
    result["per_image"] = per_image
    result["identification_p"] = p_values
    result["settings"] = {
        **asdict(settings),
        "ssim_variant": variant,
        "weights": {name: net.weights for name, net in networks.items()},
        "dtypes": {name: str(net.dtype).removeprefix("torch.") for name, net in nets.items()},
    }
    if return_features:
        result["features"] = features
    return result


def _settings(profile: str) -> ProfileSettings:
    if profile not in PROFILES:
        raise UserError(f"unknown evaluation profile {profile!r}; expected one of {PROFILES}")
    return PROFILE_SETTINGS[profile]
