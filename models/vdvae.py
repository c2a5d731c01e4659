"""VDVAE (Child 2021), ImageNet-64 model, as used by stage 1 of Brain-Diffuser.

The module tree and parameter names match the published EMA checkpoint
``imagenet64-iter-1600000-model-ema.th`` so that it loads with ``strict=True``
(2482 tensors, 125,005,860 parameters; see spec/method.md §2).

Three uses:

* :func:`extract_latents` -- images -> posterior samples of the first ``n_groups`` latent groups,
  flattened to one vector per image (91,168 dims for the real model and 31 groups).
* :func:`decode_latents` -- such vectors -> 64x64 uint8 images: the given groups are fed to the
  decoder, later groups are drawn from the prior, pixels from the discretised mixture of logistics.
* :func:`load_vdvae` -- strict, pickle-free checkpoint loading.

Randomness. Every image owns a ``torch.Generator`` (CPU) seeded with ``seeds[i]``
(default ``seed + i``, i = row index of the image in the call). All noise an image needs
(posterior or prior Gaussians in block order, then the DMoL uniforms) is drawn from its own
generator, on the CPU, in float32, and only then moved to the model's device. Hence a result
depends on the image's seed, not on the batch size, its neighbours in the batch or the device's
RNG; regenerating image ``i`` alone with ``seeds=[seed + i]`` gives the same noise.
(Floating-point results can still differ in the last bits between batch sizes or devices,
because convolution kernels may differ.)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import read_state_dict
from pipeline.errors import UserError

CHECKPOINT_NAME = "imagenet64-iter-1600000-model-ema.th"
CHECKPOINT_URL = (
    "https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets-2/" + CHECKPOINT_NAME
)

#: ImageNet-64 input normalisation: x_in = (x_uint8 + SHIFT) * SCALE, both rounded to float32
#: exactly as the reference computes them (float32 tensors, add then multiply).
INPUT_SHIFT = -115.92961967
INPUT_SCALE = 1.0 / 69.37404

#: Uniform noise range of the reference samplers (Gumbel-max and logistic).
DMOL_EPS = 1e-5
#: Lower clamp of the logistic log-scales.
DMOL_MIN_LOG_SCALE = -7.0


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VDVAEConfig:
    """Hyper-parameters that fix the architecture (names as in the reference ``hps.py``).

    ``n_latent_groups`` is not part of the network: it is the number of leading decoder
    groups Brain-Diffuser keeps (31 for ImageNet-64), used when a function gets ``n_groups=None``.
    """

    image_size: int = 64
    image_channels: int = 3
    width: int = 512
    zdim: int = 16
    bottleneck_multiple: float = 0.25
    enc_blocks: str = "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"
    dec_blocks: str = "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12"
    no_bias_above: int = 64
    num_mixtures: int = 10
    custom_width_str: str = ""
    n_latent_groups: int = 31

    @classmethod
    def imagenet64(cls) -> "VDVAEConfig":
        """The published ImageNet-64 model (spec/method.md §2.1)."""
        return cls()

    @classmethod
    def tiny(cls) -> "VDVAEConfig":
        """A ~120k-parameter model with the same code paths, for tests and demos.

        Five resolutions (1, 4, 16, 32, 64), three mixins, 1x1 and 3x3 blocks and a custom
        width (32 channels at resolutions 1 and 4, 16 elsewhere) so channel padding and slicing
        are exercised too.
        """
        return cls(
            width=16,
            zdim=4,
            bottleneck_multiple=0.25,
            enc_blocks="64x1,64d2,32x1,32d2,16x1,16d4,4x1,4d4,1x1",
            dec_blocks="1x2,4m1,4x1,16m4,16x1,32m16,64m32,64x1",
            no_bias_above=64,
            num_mixtures=3,
            custom_width_str="1:32,4:32",
            n_latent_groups=6,
        )

    @classmethod
    def miniature(cls) -> "VDVAEConfig":
        """The trained miniature of the demo (``miniature/``): same code paths as ImageNet-64 at toy size.

        32 px input, five resolutions, eight latent groups; Brain-Diffuser-style decoding keeps the
        first seven (resolutions 1 to 16, 5,384 dims) and draws the 32 px group from the prior.
        """
        return cls(
            image_size=32,
            width=32,
            zdim=8,
            bottleneck_multiple=0.5,
            enc_blocks="32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1",
            dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16",
            no_bias_above=64,
            num_mixtures=5,
            n_latent_groups=7,
        )

    def width_at(self, res: int) -> int:
        """Channel count at resolution ``res`` (``custom_width_str`` 'res:width,...' overrides)."""
        return _custom_widths(self.custom_width_str).get(res, self.width)

    def encoder_layers(self) -> list[tuple[int, int | None]]:
        """[(resolution, down_rate or None)] per encoder block."""
        return parse_layer_string(self.enc_blocks)

    def decoder_layers(self) -> list[tuple[int, int | None]]:
        """[(resolution, mixin resolution or None)] per decoder block."""
        return parse_layer_string(self.dec_blocks)


def _custom_widths(s: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in filter(None, (t.strip() for t in s.split(","))):
        try:
            res, w = item.split(":")
            out[int(res)] = int(w)
        except ValueError:
            raise UserError(f"custom_width_str: cannot parse {item!r} (expected 'resolution:width')") from None
    return out


def parse_layer_string(s: str) -> list[tuple[int, int | None]]:
    """Parse 'RxN' (N blocks at R), 'RdK' (block at R, then /K pooling), 'RmM' (mix in M), 'R'."""
    layers: list[tuple[int, int | None]] = []
    for item in (t.strip() for t in s.split(",")):
        try:
            if "x" in item:
                res, count = item.split("x")
                layers += [(int(res), None)] * int(count)
            elif "m" in item:
                res, mixin = item.split("m")
                layers.append((int(res), int(mixin)))
            elif "d" in item:
                res, rate = item.split("d")
                layers.append((int(res), int(rate)))
            else:
                layers.append((int(item), None))
        except ValueError:
            raise UserError(f"layer string {s!r}: cannot parse {item!r}") from None
    return layers


def latent_shapes(config: VDVAEConfig, n_groups: int | None = None) -> list[tuple[int, int, int]]:
    """Per-image shape (zdim, r, r) of each of the first ``n_groups`` decoder latent groups."""
    layers = config.decoder_layers()
    n_groups = _check_groups(config, n_groups)
    return [(config.zdim, res, res) for res, _ in layers[:n_groups]]


def latent_dim(config: VDVAEConfig, n_groups: int | None = None) -> int:
    """Length of the flattened latent vector (91,168 for ImageNet-64 and 31 groups)."""
    return int(sum(math.prod(s) for s in latent_shapes(config, n_groups)))


def split_latents(flat, shapes: Sequence[tuple[int, ...]]) -> list:
    """(N, D) array or tensor -> list of (N, *shape) pieces, C-order, in group order (views)."""
    sizes = [math.prod(s) for s in shapes]
    if flat.ndim != 2 or flat.shape[1] != sum(sizes):
        raise UserError(
            f"latents have shape {tuple(flat.shape)}, expected (N, {sum(sizes)}) for {len(shapes)} groups"
        )
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[:, start:start + size].reshape((flat.shape[0], *shape)))
        start += size
    return out


def _check_groups(config: VDVAEConfig, n_groups: int | None) -> int:
    n_blocks = len(config.decoder_layers())
    n = config.n_latent_groups if n_groups is None else int(n_groups)
    if not 1 <= n <= n_blocks:
        raise UserError(f"n_groups={n}: the VDVAE decoder has {n_blocks} latent groups (need 1..{n_blocks})")
    return n


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, 1, k // 2)


class Block(nn.Module):
    """Bottleneck: four GELU->conv layers (1x1, kxk, kxk, 1x1); optional residual and avg-pool."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, *, residual: bool, use_3x3: bool,
                 down_rate: int | None = None):
        super().__init__()
        k = 3 if use_3x3 else 1
        self.c1 = _conv(c_in, c_mid, 1)
        self.c2 = _conv(c_mid, c_mid, k)
        self.c3 = _conv(c_mid, c_mid, k)
        self.c4 = _conv(c_mid, c_out, 1)
        self.residual = residual
        self.down_rate = down_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


class Encoder(nn.Module):
    """Bottom-up ResNet; returns the last activation at every resolution."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.in_conv = _conv(config.image_channels, config.width, 3)
        blocks = []
        for res, down in config.encoder_layers():
            w = config.width_at(res)
            blocks.append(Block(w, int(w * config.bottleneck_multiple), w, residual=True,
                                use_3x3=res > 2, down_rate=down))
        self.enc_blocks = nn.ModuleList(blocks)
        self._config = config

    def forward(self, x_nhwc: torch.Tensor) -> dict[int, torch.Tensor]:
        """(N, H, W, 3) normalised images -> {resolution: (N, width_r, r, r)}."""
        x = self.in_conv(x_nhwc.permute(0, 3, 1, 2).contiguous())
        acts = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            res = x.shape[2]
            want = self._config.width_at(res)
            if x.shape[1] != want:  # width grows at a lower resolution: zero-pad channels
                x = torch.cat([x, x.new_zeros(x.shape[0], want - x.shape[1], res, res)], dim=1)
            acts[res] = x
        return acts


class DecBlock(nn.Module):
    """One latent group at resolution ``res``: posterior net, prior net, z projection, resnet."""

    def __init__(self, config: VDVAEConfig, res: int, mixin: int | None):
        super().__init__()
        w = config.width_at(res)
        mid = int(w * config.bottleneck_multiple)
        use_3x3 = res > 2
        self.res, self.mixin, self.zdim, self.width = res, mixin, config.zdim, w
        self.enc = Block(2 * w, mid, 2 * config.zdim, residual=False, use_3x3=use_3x3)
        self.prior = Block(w, mid, 2 * config.zdim + w, residual=False, use_3x3=use_3x3)
        self.z_proj = _conv(config.zdim, w, 1)
        self.resnet = Block(w, mid, w, residual=True, use_3x3=use_3x3)

    def block_input(self, xs: dict[int, torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
        """Current state at this resolution (learned bias or zeros), plus the upsampled mixin."""
        x = xs.get(self.res)
        if x is None:
            x = like.new_zeros(n, self.width, self.res, self.res)
        elif x.shape[0] != n:
            x = x.expand(n, -1, -1, -1)
        if self.mixin is not None:
            up = F.interpolate(xs[self.mixin][:, : x.shape[1]], scale_factor=self.res // self.mixin)
            x = x + up
        return x

    def prior_stats(self, x: torch.Tensor):
        """-> prior mean, prior log-std (each (N, zdim, r, r)) and the residual xpp (N, w, r, r)."""
        f = self.prior(x)
        return f[:, : self.zdim], f[:, self.zdim: 2 * self.zdim], f[:, 2 * self.zdim:]

    def posterior_stats(self, x: torch.Tensor, acts: torch.Tensor):
        """-> posterior mean and log-std, each (N, zdim, r, r)."""
        return self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)

    def finish(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.resnet(x + self.z_proj(z))


class DmolNet(nn.Module):
    """1x1 conv to the discretised-mixture-of-logistics parameters (K logits + 3 x 3K)."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.num_mixtures = config.num_mixtures
        self.out_conv = _conv(config.width, config.num_mixtures * 10, 1)

    def forward(self, px_z: torch.Tensor) -> torch.Tensor:
        """(N, width, H, W) -> (N, H, W, 10K) distribution parameters."""
        return self.out_conv(px_z).permute(0, 2, 3, 1)


class Decoder(nn.Module):
    """Top-down hierarchy of latent groups, learned per-resolution start states, output head."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        layers = config.decoder_layers()
        self.dec_blocks = nn.ModuleList(DecBlock(config, res, mixin) for res, mixin in layers)
        self.resolutions = sorted({res for res, _ in layers})
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, config.width_at(r), r, r))
            for r in self.resolutions if r <= config.no_bias_above
        )
        self.out_net = DmolNet(config)
        self.gain = nn.Parameter(torch.ones(1, config.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, config.width, 1, 1))
        self.image_size = config.image_size

    def start_states(self) -> dict[int, torch.Tensor]:
        return {int(b.shape[2]): b for b in self.bias_xs}

    def posterior_latents(self, acts: dict[int, torch.Tensor], n_groups: int,
                          noise: "PerImageNoise | None") -> list[torch.Tensor]:
        """Run the first ``n_groups`` blocks conditioned on encoder activations.

        Returns the z of each group, (N, zdim, r, r): posterior samples ``qm + exp(qv) * eps``,
        or posterior means when ``noise`` is None. Later groups cannot influence these, so they
        are not computed.
        """
        xs = self.start_states()
        n = next(iter(acts.values())).shape[0]
        zs = []
        for block in self.dec_blocks[:n_groups]:
            a = acts[block.res]
            x = block.block_input(xs, n, a)
            qm, qv = block.posterior_stats(x, a)
            _, _, xpp = block.prior_stats(x)
            x = x + xpp
            z = qm if noise is None else qm + torch.exp(qv) * noise.normal(qm.shape[1:], qm)
            xs[block.res] = block.finish(x, z)
            zs.append(z)
        return zs

    def forward_manual_latents(self, latents: Sequence[torch.Tensor], noise: "PerImageNoise",
                               temperature: float | None = None) -> torch.Tensor:
        """Decode with z given for the first ``len(latents)`` groups and prior samples after.

        latents: list of (N, zdim, r, r). Returns px_z (N, width, image_size, image_size).
        ``temperature`` scales the prior std of the sampled groups (None or 1 = unchanged; 0 = the
        prior mean, as the reference's ``pv + log(t)`` gives at t = 0).
        """
        if temperature is not None and not (temperature >= 0.0 and math.isfinite(temperature)):
            raise UserError(f"VDVAE temperature must be a finite number >= 0, got {temperature}")
        n = noise.n
        ref = self.gain
        xs = self.start_states()
        for i, block in enumerate(self.dec_blocks):
            x = block.block_input(xs, n, ref)
            pm, pv, xpp = block.prior_stats(x)
            x = x + xpp
            if i < len(latents):
                z = latents[i].to(device=x.device, dtype=x.dtype)
            else:
                eps = noise.normal(pm.shape[1:], pm)  # drawn at every temperature: later draws stay aligned
                if temperature is None or temperature == 1.0:
                    z = pm + torch.exp(pv) * eps
                elif temperature == 0.0:  # the reference's exp(pv + log 0) = 0: the prior mean
                    z = pm
                else:
                    z = pm + torch.exp(pv + math.log(temperature)) * eps
            xs[block.res] = block.finish(x, z)
        return xs[self.image_size] * self.gain + self.bias


class VDVAE(nn.Module):
    """Encoder + decoder; ``state_dict()`` keys match the published checkpoints."""

    def __init__(self, config: VDVAEConfig | None = None):
        super().__init__()
        config = config or VDVAEConfig.imagenet64()
        _validate_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)


def _validate_config(c: VDVAEConfig) -> None:
    enc_res = {c.image_size}
    for res, down in c.encoder_layers():
        enc_res.add(res // down if down else res)
    for res, mixin in c.decoder_layers():
        if res not in enc_res:
            raise UserError(f"dec_blocks: resolution {res} has no encoder activation (encoder gives {sorted(enc_res)})")
        if mixin is not None and (res % mixin or c.width_at(mixin) < c.width_at(res)):
            raise UserError(f"dec_blocks: cannot mix resolution {mixin} into {res}")
    if c.width_at(c.image_size) != c.width:
        raise UserError("custom_width_str must not change the width at image_size")


def random_init_(model: VDVAE, seed: int = 0) -> VDVAE:
    """Fill every parameter with seeded random values (tests and demos; real use loads weights).

    Conv weights ~ N(0, 1/fan_in); residual-branch outputs and z projections are scaled by
    sqrt(1/n_blocks) and the prior's last layer by 0.1 (as the reference's init keeps the
    untrained model stable); biases and start states ~ N(0, 0.1^2 or 0.5^2).
    """
    g = torch.Generator().manual_seed(seed)
    n_enc = len(model.encoder.enc_blocks)
    n_dec = len(model.decoder.dec_blocks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("weight"):
                fan_in = math.prod(p.shape[1:])
                r = r / math.sqrt(fan_in)
                if name.startswith("encoder.enc_blocks") and ".c4." in name:
                    r = r * math.sqrt(1 / n_enc)
                elif ".resnet.c4." in name or ".z_proj." in name:
                    r = r * math.sqrt(1 / n_dec)
                elif ".prior.c4." in name:
                    r = r * 0.1
            elif name.startswith("decoder.bias_xs"):
                r = r * 0.5
            elif name == "decoder.gain":
                r = 1.0 + 0.1 * r
            else:
                r = r * 0.1
            p.copy_(r.to(p.dtype))
    return model


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_vdvae(path: str | os.PathLike, config: VDVAEConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> VDVAE:
    """Build a VDVAE for ``config`` (default ImageNet-64) and load ``path`` strictly.

    ``path`` is a ``.th``/``.pt`` state dict (read with ``weights_only=True``) or ``.safetensors``.
    A ``module.`` key prefix is stripped. Returns the model in eval mode, gradients off.
    """
    path = Path(path)
    config = config or VDVAEConfig.imagenet64()
    if not path.is_file():
        raise UserError(
            f"{path}: VDVAE checkpoint not found; download {CHECKPOINT_URL} "
            f"(or run `make weights`) and point to the file"
        )
    state = read_state_dict(path, "VDVAE")
    with torch.device("meta"):
        model = VDVAE(config)
    _check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, show: int = 5) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)}!={expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:show])}{more}")
        raise UserError(f"{path}: does not match the VDVAE config; " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------------


class PerImageNoise:
    """One CPU ``torch.Generator`` per image; draws are stacked along the batch axis.

    Drawing on the CPU in float32 makes an image's noise independent of the batch it is in,
    the device and the model dtype.
    """

    def __init__(self, seeds: Iterable[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    @property
    def n(self) -> int:
        return len(self.generators)

    def normal(self, shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
        """(N, *shape) standard normal, moved to ``like``'s device/dtype."""
        out = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return out if like is None else out.to(device=like.device, dtype=like.dtype)

    def uniform(self, shape: Sequence[int], low: float = DMOL_EPS, high: float = 1.0 - DMOL_EPS) -> torch.Tensor:
        """(N, *shape) float32 uniform on [low, high) (the reference's ``uniform_(low, high)``)."""
        return torch.stack([torch.rand(tuple(shape), generator=g) for g in self.generators]) * (high - low) + low


def _seeds_for(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise UserError(f"seeds has {len(seeds)} entries but there are {n} images")
    return seeds


# --------------------------------------------------------------------------------------------
# pixels <-> model
# --------------------------------------------------------------------------------------------


def preprocess(images_uint8: np.ndarray, image_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 64, 64, 3) float32 normalised model input (NHWC).

    As the reference: PIL image -> torchvision ``resize`` to (64, 64) (PIL bilinear, which always
    antialiases) -> float -> ``(x + SHIFT) * SCALE`` in float32.
    """
    from PIL import Image
    import torchvision.transforms.functional as TF

    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    small = np.stack([np.asarray(TF.resize(Image.fromarray(im), [image_size, image_size])) for im in images])
    x = torch.from_numpy(small).float()
    shift = torch.tensor([INPUT_SHIFT], dtype=torch.float32)
    scale = torch.tensor([INPUT_SCALE], dtype=torch.float32)
    return ((x + shift) * scale).to(device)


def sample_dmol(params: torch.Tensor, num_mixtures: int, u_mix: torch.Tensor, u_logistic: torch.Tensor) -> torch.Tensor:
    """Sample RGB values in [-1, 1] from discretised-mixture-of-logistics parameters.

    params: (N, H, W, 10K): [0:K] mixture logits, then (3 colours x 3K) = per colour K means,
    K log-scales (clamped at -7), K pre-tanh coupling coefficients.
    u_mix: (N, H, W, K) and u_logistic: (N, H, W, 3) uniforms in (0, 1), supplied by the caller.
    Computed in float32 whatever the model dtype.
    Mixture by Gumbel-max, logistic sample ``m + exp(s) * logit(u)``, then the autoregressive
    colour coupling r; g + c0 r; b + c1 r + c2 g, each clipped to [-1, 1]. Returns (N, H, W, 3).
    """
    k = num_mixtures
    params = params.float()
    n, h, w, _ = params.shape
    logits = params[..., :k]
    rest = params[..., k:].reshape(n, h, w, 3, 3 * k)
    u_mix = u_mix.to(device=params.device, dtype=params.dtype)
    u_logistic = u_logistic.to(device=params.device, dtype=params.dtype)
    choice = torch.argmax(logits - torch.log(-torch.log(u_mix)), dim=3)  # (N, H, W)
    idx = choice[..., None, None].expand(n, h, w, 3, 1)
    mean = torch.gather(rest[..., :k], 4, idx)[..., 0]
    log_scale = torch.gather(rest[..., k: 2 * k], 4, idx)[..., 0].clamp(min=DMOL_MIN_LOG_SCALE)
    coeff = torch.tanh(torch.gather(rest[..., 2 * k:], 4, idx)[..., 0])
    x = mean + torch.exp(log_scale) * (torch.log(u_logistic) - torch.log(1.0 - u_logistic))
    return _couple_colours(x, coeff)


def _couple_colours(x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """The DMoL head's autoregressive colour coupling on dim 3 (the colour axis) of (N, H, W, 3, ...):
    r; g + c0 r; b + c1 r + c2 g, each clipped to [-1, 1]."""
    r = x[:, :, :, 0].clamp(-1.0, 1.0)
    g = (x[:, :, :, 1] + coeff[:, :, :, 0] * r).clamp(-1.0, 1.0)
    b = (x[:, :, :, 2] + coeff[:, :, :, 1] * r + coeff[:, :, :, 2] * g).clamp(-1.0, 1.0)
    return torch.stack([r, g, b], dim=3)


def mean_dmol(params: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """The DMoL head's average pixel: each component's centre (logistic noise zero, colour coupling
    applied, clipped to [-1, 1]) weighted by the mixture's softmax. Layout as :func:`sample_dmol`.

    A miniature VDVAE trained for minutes keeps a wide mixture, so a draw per pixel is speckle;
    the average is the smooth, blurry init image the method expects."""
    k = num_mixtures
    params = params.float()
    n, h, w, _ = params.shape
    weight = torch.softmax(params[..., :k], dim=-1)  # (N, H, W, K)
    rest = params[..., k:].reshape(n, h, w, 3, 3 * k)
    centre, coeff = rest[..., :k], torch.tanh(rest[..., 2 * k:])  # (N, H, W, 3, K)
    return (weight[:, :, :, None, :] * _couple_colours(centre, coeff)).sum(-1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 via (x + 1) * 127.5, clipped to [0, 255], truncated (reference)."""
    v = ((x + 1.0) * 127.5).detach().float().cpu().numpy()
    return np.clip(v, 0.0, 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the two Brain-Diffuser uses
# --------------------------------------------------------------------------------------------


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img")


@torch.no_grad()
def extract_latents(model: VDVAE, images_uint8, n_groups: int | None = None, batch_size: int = 30,
                    seed: int = 0, seeds: Sequence[int] | None = None, posterior: str = "sample",
                    out: np.ndarray | None = None, progress: bool | None = None) -> np.ndarray:
    """Images -> flattened latents of the first ``n_groups`` decoder groups.

    images_uint8: (N, H, W, 3) uint8 (any array with slicing, e.g. a memmap or h5py dataset).
    Returns (N, D) float32, D = ``latent_dim(config, n_groups)`` (91,168 for ImageNet-64, 31
    groups): per image, each group's z flattened in C-order (c, h, w), groups in block order.
    ``posterior='sample'`` (Brain-Diffuser) draws ``qm + exp(qv) * eps`` with eps from the
    image's generator (seed ``seeds[i]``, default ``seed + i``); ``'mean'`` returns ``qm``.
    ``out``: optional preallocated (N, D) array (e.g. a memmap) to fill and return.
    Runs on the model's device and dtype.
    """
    if posterior not in ("sample", "mean"):
        raise UserError(f"posterior={posterior!r}: expected 'sample' or 'mean'")
    config = model.config
    n_groups = _check_groups(config, n_groups)
    n = len(images_uint8)
    all_seeds = _seeds_for(n, seed, seeds)
    dim = latent_dim(config, n_groups)
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    elif out.shape != (n, dim):
        raise UserError(f"out has shape {out.shape}, expected {(n, dim)}")
    device, dtype = _model_device_dtype(model)
    bar = _progress(n, n > batch_size if progress is None else progress, "VDVAE encode")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = preprocess(np.ascontiguousarray(images_uint8[start:stop]), config.image_size).to(device=device, dtype=dtype)
        acts = model.encoder(x)
        noise = PerImageNoise(all_seeds[start:stop]) if posterior == "sample" else None
        zs = model.decoder.posterior_latents(acts, n_groups, noise)
        flat = torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)
        out[start:stop] = flat.float().cpu().numpy()
        bar.update(stop - start)
    bar.close()
    return out


@torch.no_grad()
def decode_latents(model: VDVAE, latents: np.ndarray, n_groups: int | None = None, batch_size: int = 30,
                   seed: int = 0, seeds: Sequence[int] | None = None, temperature: float | None = None,
                   progress: bool | None = None, pixels: str = "sample") -> np.ndarray:
    """Flattened latents of the first ``n_groups`` groups -> (N, 64, 64, 3) uint8 images.

    latents: (N, D) with D = ``latent_dim(config, n_groups)``. Groups 0..n_groups-1 use the given
    z (their prior still adds its residual), the remaining groups draw z from the prior
    (``temperature`` None/1 = unchanged, 0 = the prior mean), then pixels are drawn from the DMoL head. Image i's
    noise (prior Gaussians in block order, then the mixture and logistic uniforms) comes from a
    generator seeded with ``seeds[i]`` (default ``seed + i``), so
    ``decode_latents(model, latents[i:i+1], seeds=[seed + i])`` reproduces image i.
    ``pixels="mean"`` takes the head's average pixel instead of a draw (:func:`mean_dmol`).
    """
    if pixels not in ("sample", "mean"):
        raise UserError(f"pixels = {pixels!r}: expected 'sample' or 'mean'")
    config = model.config
    n_groups = _check_groups(config, n_groups)
    latents = np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents
    shapes = latent_shapes(config, n_groups)
    if latents.ndim != 2 or latents.shape[1] != latent_dim(config, n_groups):
        raise UserError(
            f"latents have shape {tuple(latents.shape)}, expected (N, {latent_dim(config, n_groups)}) "
            f"for {n_groups} groups"
        )
    n = latents.shape[0]
    all_seeds = _seeds_for(n, seed, seeds)
    device, dtype = _model_device_dtype(model)
    size, k = config.image_size, config.num_mixtures
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    bar = _progress(n, n > batch_size if progress is None else progress, "VDVAE decode")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = torch.from_numpy(np.ascontiguousarray(latents[start:stop], dtype=np.float32))
        groups = [g.to(device=device, dtype=dtype) for g in split_latents(batch, shapes)]
        noise = PerImageNoise(all_seeds[start:stop])
        px_z = model.decoder.forward_manual_latents(groups, noise, temperature)
        params = model.decoder.out_net(px_z)
        if pixels == "mean":
            images[start:stop] = to_uint8(mean_dmol(params, k))
        else:
            u_mix = noise.uniform((size, size, k))
            u_log = noise.uniform((size, size, 3))
            images[start:stop] = to_uint8(sample_dmol(params, k, u_mix, u_log))
        bar.update(stop - start)
    bar.close()
    return images


# --------------------------------------------------------------------------------------------
# training objective (the reference's ELBO: DMoL likelihood + analytic KL per latent group)
# --------------------------------------------------------------------------------------------


def dmol_log_likelihood(params: torch.Tensor, x: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """Per-image log-likelihood (nats) of 8-bit images under the discretised mixture of logistics.

    params: (N, H, W, 10K) as :class:`DmolNet` gives; x: (N, H, W, 3) targets in [-1, 1]
    (``uint8 / 127.5 - 1``). Bins have width 2/255; the two edge bins extend to ±infinity; the
    colour coupling is the one :func:`sample_dmol` samples from (g | r, b | r, g). Returns (N,).
    """
    k = num_mixtures
    n, h, w, _ = params.shape
    logits = params[..., :k]
    rest = params[..., k:].reshape(n, h, w, 3, 3 * k)
    means = rest[..., :k]
    log_scales = rest[..., k: 2 * k].clamp(min=DMOL_MIN_LOG_SCALE)
    coeffs = torch.tanh(rest[..., 2 * k:])
    xk = x[..., None]  # (N, H, W, 3, 1)
    m_r = means[..., 0, :]
    m_g = means[..., 1, :] + coeffs[..., 0, :] * xk[..., 0, :]
    m_b = means[..., 2, :] + coeffs[..., 1, :] * xk[..., 0, :] + coeffs[..., 2, :] * xk[..., 1, :]
    centred = xk - torch.stack([m_r, m_g, m_b], dim=3)
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centred + 1.0 / 255.0)
    min_in = inv_s * (centred - 1.0 / 255.0)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid: lowest bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # highest bin
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centred
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # density at the bin centre
    log_inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    log_probs = torch.where(xk < -0.999, log_cdf_plus, torch.where(xk > 0.999, log_one_minus_cdf_min, log_inner))
    per_mix = log_probs.sum(dim=3) + torch.log_softmax(logits, dim=-1)  # (N, H, W, K)
    return torch.logsumexp(per_mix, dim=-1).sum(dim=(1, 2))


def gaussian_kl(mu_q: torch.Tensor, logstd_q: torch.Tensor, mu_p: torch.Tensor, logstd_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(q || p) of diagonal Gaussians given means and log-stds."""
    return (-0.5 + logstd_p - logstd_q
            + 0.5 * (torch.exp(2 * logstd_q) + (mu_q - mu_p) ** 2) / torch.exp(2 * logstd_p))


def elbo(model: VDVAE, x_in: torch.Tensor, x_target: torch.Tensor, generator: torch.Generator | None = None
         ) -> dict[str, torch.Tensor]:
    """Negative ELBO of a batch, in nats per dimension (the reference's training loss).

    x_in: (N, 64, 64, 3) normalised encoder input (:func:`preprocess`); x_target: the same images
    as (N, 64, 64, 3) in [-1, 1]. Every decoder group samples z from its posterior
    (reparameterised, noise from ``generator``) and pays KL(q || p) against its prior.
    Returns {"loss", "distortion", "rate"} (batch means per dimension) and "kl_groups" (per group).
    """
    dec = model.decoder
    acts = model.encoder(x_in)
    n = x_in.shape[0]
    xs = dec.start_states()
    kls = []
    for block in dec.dec_blocks:
        a = acts[block.res]
        x = block.block_input(xs, n, a)
        qm, qv = block.posterior_stats(x, a)
        pm, pv, xpp = block.prior_stats(x)
        x = x + xpp
        eps = torch.randn(qm.shape, generator=generator, device=qm.device, dtype=qm.dtype)
        z = qm + torch.exp(qv) * eps
        kls.append(gaussian_kl(qm, qv, pm, pv).sum(dim=(1, 2, 3)))
        xs[block.res] = block.finish(x, z)
    px_z = xs[dec.image_size] * dec.gain + dec.bias
    ll = dmol_log_likelihood(dec.out_net(px_z), x_target, model.config.num_mixtures)
    n_dims = math.prod(x_target.shape[1:])
    kl = torch.stack(kls, dim=1)  # (N, groups)
    distortion = -ll / n_dims
    rate = kl.sum(dim=1) / n_dims
    return {"loss": (distortion + rate).mean(), "distortion": distortion.mean(), "rate": rate.mean(),
            "kl_groups": kl.mean(dim=0) / n_dims}


__all__ = [
    "CHECKPOINT_NAME", "CHECKPOINT_URL", "VDVAE", "VDVAEConfig", "PerImageNoise", "decode_latents",
    "dmol_log_likelihood", "elbo", "extract_latents", "gaussian_kl", "latent_dim", "latent_shapes", "load_vdvae", "parse_layer_string", "preprocess",
    "random_init_", "sample_dmol", "split_latents", "to_uint8",
]
