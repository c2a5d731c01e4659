"""The two networks of the iCNN baseline (Shen et al. 2019): VGG19 encoder and relu7 deep generator.

Real weights are the PyTorch conversions the Kamitani lab publishes for ``bdpy.dl.torch.models``
(state dicts for ``VGG19`` and ``AlexNetGenerator``), loaded strictly and without unpickling:

=========================  ==========================================================================
config key (weights_dir/)  source and expected format
=========================  ==========================================================================
``icnn.vgg19``             figshare file 38225868 (``VGG_ILSVRC_19_layers.zip``, md5
                           ``49f4d6dbf1024f33149352dfd309dc4d``, the Caffe VGG19 converted to PyTorch;
                           member ``VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt``, unpacked by
                           ``make weights`` to ``icnn/vgg19.pt``): a flat state dict of
                           ``bdpy.dl.torch.models.VGG19`` (keys ``features.N.*``, ``classifier.N.*``),
                           ``.pt`` (read with ``weights_only=True``) or ``.safetensors``.
``icnn.generator``         figshare file 38361230 (``bvlc_reference_caffenet_generator_ILSVRC2012_
                           Training.zip``, md5 ``bf9d4de43782cb019de733ed7cf84926``, Dosovitskiy &
                           Brox's relu7 "DeepSim" generator converted to PyTorch; member
                           ``bvlc_reference_caffenet_generator_ILSVRC2012_Training/generator_relu7.pt``,
                           unpacked to ``icnn/generator_relu7.pt``): a state dict of
                           ``bdpy.dl.torch.models.AlexNetGenerator``.
``icnn.generator_bound``   the same archive's upper bound of the generator input (member ending in
                           ``act_range/3x/relu7.txt``, unpacked to
                           ``icnn/generator_relu7_act_range_3x.txt``): 4096 whitespace-separated
                           numbers (3x the relu7 activation range).
=========================  ==========================================================================

(Download links: ``https://figshare.com/ndownloader/files/<id>``, ids and md5s as the lab's
``brain-decoding-cookbook`` ``data/files.json`` lists them today; ``make weights`` fetches, verifies
and unpacks both archives. A checkpoint pickled as a whole module is refused: re-save its ``state_dict()``.)

Image domains, as the lab's scripts: the encoder takes Caffe input (BGR, 0..255 minus the
per-channel mean ``IMAGE_MEAN_BGR``, ``(N, 3, H, W)``); the generator emits the same domain at
256x256, which is centre-cropped to the encoder's size.

With ``run.tiny_models`` both networks are seeded random instances of the same module trees with
narrow layers (``tiny_vgg19``, ``tiny_generator``): same layer indices, so ``bdpy``'s
``layer_map('vgg19')`` addresses them too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from models import checkpoint
from pipeline.errors import UserError

#: Caffe/ImageNet mean in BGR order, subtracted from 0..255 pixels (the lab's ``image_preprocess``).
IMAGE_MEAN_BGR = (104.0, 117.0, 123.0)
#: Generator output side (both the real relu7 generator and the tiny one).
GENERATOR_SIZE = 256
TINY_SEED = 4321
TINY_PIXEL_SD = 50.0

_VGG19_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M")
_TINY_VGG_WIDTHS = (4, 4, "M", 8, 8, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M")
_GEN_WIDTHS = (256, 512, 256, 256, 128, 128, 64, 32)  # deconv5, conv5_1, deconv4, ..., deconv1
_TINY_GEN_WIDTHS = (8, 8, 8, 8, 8, 8, 8, 8)


# --------------------------------------------------------------------------------------------
# architectures (module trees identical to bdpy.dl.torch.models.VGG19 / AlexNetGenerator)
# --------------------------------------------------------------------------------------------


class VGG19(nn.Module):
    """``bdpy``'s VGG19 with configurable widths: (N, 3, H, W) Caffe-domain images → (N, n_classes)."""

    def __init__(self, widths: Sequence = _VGG19_WIDTHS, fc_dim: int = 4096, n_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False))
            else:
                layers += [nn.Conv2d(c_in, int(w), kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=False)]
                c_in = int(w)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(output_size=(7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 7 * 7, fc_dim), nn.ReLU(inplace=False), nn.Dropout(p=0.5),
            nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=False), nn.Dropout(p=0.5),
            nn.Linear(fc_dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class DeepSimGenerator(nn.Module):
    """``bdpy``'s AlexNetGenerator (relu7 DGN) with configurable widths: (N, latent) → (N, 3, 256, 256).

    Three leaky fully connected layers, a reshape to ``fc_dim/16`` channels at 4x4, then six
    stride-2 transposed convolutions (4 → 256 px). Sub-modules are registered both by name and
    inside ``defc``/``deconv``, as in bdpy, so state-dict keys match the lab's checkpoints.
    """

    def __init__(self, latent_dim: int = 4096, fc_dim: int = 4096, widths: Sequence[int] = _GEN_WIDTHS):
        super().__init__()
        if fc_dim % 16:
            raise ValueError(f"fc_dim must be a multiple of 16 (4x4 spatial), got {fc_dim}")
        w5, w51, w4, w41, w3, w31, w2, w1 = (int(w) for w in widths)
        c0 = fc_dim // 16
        self.fc_channels = c0
        lrelu = lambda: nn.LeakyReLU(0.3, inplace=True)  # noqa: E731
        self.defc7, self.relu_defc7 = nn.Linear(latent_dim, fc_dim), lrelu()
        self.defc6, self.relu_defc6 = nn.Linear(fc_dim, fc_dim), lrelu()
        self.defc5, self.relu_defc5 = nn.Linear(fc_dim, fc_dim), lrelu()
        self.deconv5, self.relu_deconv5 = nn.ConvTranspose2d(c0, w5, 4, 2, 1), lrelu()
        self.conv5_1, self.relu_conv5_1 = nn.ConvTranspose2d(w5, w51, 3, 1, 1), lrelu()
        self.deconv4, self.relu_deconv4 = nn.ConvTranspose2d(w51, w4, 4, 2, 1), lrelu()
        self.conv4_1, self.relu_conv4_1 = nn.ConvTranspose2d(w4, w41, 3, 1, 1), lrelu()
        self.deconv3, self.relu_deconv3 = nn.ConvTranspose2d(w41, w3, 4, 2, 1), lrelu()
        self.conv3_1, self.relu_conv3_1 = nn.ConvTranspose2d(w3, w31, 3, 1, 1), lrelu()
        self.deconv2, self.relu_deconv2 = nn.ConvTranspose2d(w31, w2, 4, 2, 1), lrelu()
        self.deconv1, self.relu_deconv1 = nn.ConvTranspose2d(w2, w1, 4, 2, 1), lrelu()
        self.deconv0 = nn.ConvTranspose2d(w1, 3, 4, 2, 1)
        self.defc = nn.Sequential(self.defc7, self.relu_defc7, self.defc6, self.relu_defc6,
                                  self.defc5, self.relu_defc5)
        self.deconv = nn.Sequential(
            self.deconv5, self.relu_deconv5, self.conv5_1, self.relu_conv5_1,
            self.deconv4, self.relu_deconv4, self.conv4_1, self.relu_conv4_1,
            self.deconv3, self.relu_deconv3, self.conv3_1, self.relu_conv3_1,
            self.deconv2, self.relu_deconv2, self.deconv1, self.relu_deconv1, self.deconv0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.defc(z).view(-1, self.fc_channels, 4, 4)
        return self.deconv(f)


def _seeded(factory, seed: int) -> nn.Module:
    """Build a module with PyTorch's default init drawn from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def tiny_vgg19(seed: int = TINY_SEED) -> VGG19:
    """A seeded narrow VGG19 (4–8 channels, 32-d fc, 10 classes): same layers and indices.

    Kaiming-initialised with zero biases: with PyTorch's default init the deep narrow stack's fc
    features would be nearly the same for every image, leaving nothing to decode.
    """
    def build():
        net = VGG19(_TINY_VGG_WIDTHS, fc_dim=32, n_classes=10)
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                    nn.init.zeros_(mod.bias)
        return net

    return _seeded(build, seed)


def tiny_generator(seed: int = TINY_SEED) -> DeepSimGenerator:
    """A seeded narrow relu7 generator: 64-d input, 8-channel deconvolutions, 256 px output.

    The last layer is rescaled so that codes ~ N(0, 1) give pixels with SD ≈ ``TINY_PIXEL_SD`` (the
    real generator's output spans the Caffe pixel range). Weights are Kaiming-initialised and biases
    zero, so the image depends on the code (PyTorch's default init would make it nearly constant).
    """
    def build():
        gen = DeepSimGenerator(latent_dim=64, fc_dim=128, widths=_TINY_GEN_WIDTHS)
        with torch.no_grad():  # variance-preserving init so that the image depends on the code
            for m in gen.modules():
                if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
                    nn.init.kaiming_normal_(m.weight, a=0.3, nonlinearity="leaky_relu",
                                            mode="fan_out" if isinstance(m, nn.ConvTranspose2d) else "fan_in")
                    nn.init.zeros_(m.bias)
            sd = gen(torch.randn(16, 64).abs()).std()
            gen.deconv0.weight.mul_(TINY_PIXEL_SD / sd)
            gen.deconv0.bias.mul_(TINY_PIXEL_SD / sd)
        return gen

    return _seeded(build, seed)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@dataclass
class ICNNModels:
    """What the iCNN step needs: frozen encoder/generator in eval mode and the latent box."""

    encoder: nn.Module
    generator: nn.Module
    latent_dim: int
    upper_bound: np.ndarray | None  # (latent_dim,) float32 or None (no upper clip)
    lower_bound: float = 0.0  # relu7 codes are non-negative


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The iCNN weight file at ``path`` as a flat state dict (missing → how to get it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} weights not found; run `make weights` or download them "
                        f"(see models/icnn.py) and set icnn.* paths relative to paths.weights_dir")
    return checkpoint.read_state_dict(path, what)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> nn.Module:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unknown = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unknown or wrong:
        raise UserError(f"{path}: not a {what} state dict (missing {missing[:3]}, unexpected {unknown[:3]}, "
                        f"wrong shapes {wrong[:3]})")
    model.load_state_dict(state, strict=True)
    return model


def load_vgg19(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """bdpy's VGG19 with the lab's converted Caffe weights, eval mode, gradients off."""
    from bdpy.dl.torch.models import VGG19 as BdpyVGG19

    path = Path(path)
    model = _load_into(BdpyVGG19(), read_state_dict(path, "VGG19"), path, "VGG19")
    return model.to(device).eval().requires_grad_(False)


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """bdpy's AlexNetGenerator (relu7 DGN) with the lab's converted weights, eval mode, gradients off."""
    from bdpy.dl.torch.models import AlexNetGenerator

    path = Path(path)
    model = _load_into(AlexNetGenerator(), read_state_dict(path, "relu7 generator"), path, "relu7 generator")
    return model.to(device).eval().requires_grad_(False)


def load_upper_bound(path: str | os.PathLike, latent_dim: int = 4096) -> np.ndarray:
    """The generator-input upper bound: ``latent_dim`` whitespace-separated numbers → float32."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: relu7 generator input bound not found (act_range_3x / fc7.txt of the "
                        f"generator archive); run `make weights` or set icnn.generator_bound = \"\" to not clip")
    try:
        bound = np.loadtxt(path, dtype=np.float64).astype(np.float32).ravel()
    except ValueError as exc:
        raise UserError(f"{path}: cannot read the generator bound as numbers ({exc})") from None
    if bound.size != latent_dim or not np.all(np.isfinite(bound)):
        raise UserError(f"{path}: expected {latent_dim} finite numbers, got {bound.size}")
    return bound


def load_icnn_models(cfg, device: str | torch.device = "cpu") -> ICNNModels:
    """Encoder + generator from the config: tiny seeded ones with ``run.tiny_models``, else real weights."""
    enc = load_encoder(cfg, device)
    if cfg.run.tiny_models:
        gen = tiny_generator().to(device).eval().requires_grad_(False)
        return ICNNModels(enc, gen, latent_dim=gen.defc7.in_features, upper_bound=None)
    c = cfg.icnn
    gen = load_generator(cfg.resolve_path(c.generator, "weights_dir"), device)
    bound = load_upper_bound(cfg.resolve_path(c.generator_bound, "weights_dir")) if c.generator_bound else None
    return ICNNModels(enc, gen, latent_dim=4096, upper_bound=bound)


def load_encoder(cfg, device: str | torch.device = "cpu") -> nn.Module:
    """The VGG19 alone (feature extraction needs no generator): tiny seeded one with ``run.tiny_models``."""
    if cfg.run.tiny_models:
        return tiny_vgg19().to(device).eval().requires_grad_(False)
    return load_vgg19(cfg.resolve_path(cfg.icnn.vgg19, "weights_dir"), device)


def check_weight_files(cfg) -> None:
    """Fail with the loaders' one-line errors when a weight file the config names is absent (nothing is
    loaded: the iCNN step checks this before its first long stage)."""
    if cfg.run.tiny_models:
        return
    c = cfg.icnn
    for value, what in ((c.vgg19, "VGG19"), (c.generator, "relu7 generator")):
        path = cfg.resolve_path(value, "weights_dir")
        if not path.is_file():
            read_state_dict(path, what)  # raises the "not found; run `make weights`" error
    if c.generator_bound and not cfg.resolve_path(c.generator_bound, "weights_dir").is_file():
        load_upper_bound(cfg.resolve_path(c.generator_bound, "weights_dir"))
