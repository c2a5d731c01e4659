"""Convert Brain-Diffuser's Versatile Diffusion checkpoint (original VD code base) into this project's
diffusers components.

Brain-Diffuser loads ``vd-four-flow-v1-0-fp16-deprecated.pth``: one flat state dict of the original
VD model (``lib/model_zoo/vd.py`` class ``VD``), fp16. Its parts (read from the published code):

* ``model.diffusion_model.unet_image.*``  image UNet (``openai_unet_2d``: ResBlocks + SpatialTransformers)
* ``model.diffusion_model.unet_text.*``   text UNet (``openai_unet_0dmd``: FC blocks + SpatialTransformers)
* ``model.diffusion_model.time_embed.*``  the time embedding shared by both UNets
* ``autokl.*``                            the AutoKL (SD kl-f8) VAE; ``kl-f8.pth`` holds the same keys unprefixed
* ``optimus.*``, ``clip.*``, DDPM schedule buffers, ``model_ema.*``  not needed here (see UNUSED)

Brain-Diffuser's image flow (``UNetModelVD.forward_dc``, method.md §5.2 step 10) runs the image UNet's
ResBlocks and, at every SpatialTransformer slot, the image UNet's transformer (vision context) and
the text UNet's transformer *at the same position* (text context). The converter writes exactly that
network: a ``UNet2DConditionModel`` whose attention slots are ``DualTransformer2DModel``s with
``transformers[0]`` = image transformer, ``transformers[1]`` = text transformer. The text UNet's
other layers generate text (the "text flow") and are never run by Brain-Diffuser: they are listed
as deliberately unused, key by key.

Every checkpoint key is either mapped (``key_table``) or deliberately unused (``unused_keys``);
anything else, or a mapped key that is absent, is an error that lists the keys. The key table is
documented in ``docs/vd_checkpoint_keys.md``.

Usage::

    python -m models.vd_convert convert vd-four-flow-v1-0-fp16-deprecated.pth weights/versatile-diffusion
    python -m models.vd_convert convert VD.pth OUT --vae kl-f8.pth   # AutoKL from its own file
    python -m models.vd_convert keys VD.pth                          # classify the keys, convert nothing
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import UserError

log = logging.getLogger("recon")

UNET = "model.diffusion_model."
IMAGE = UNET + "unet_image."
TEXT = UNET + "unet_text."
AUTOKL = "autokl."

# DDPM buffers of the original model (sd.py DDPM.register_schedule); the schedule is rebuilt from
# its constants (models.versatile.vd_scheduler), so these are checked against it, not copied.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor",
)
# Deliberately unused prefixes, with the reason (reported by the `keys` command).
UNUSED_PREFIXES = {
    "optimus.": "Optimus text VAE (VD's text flow; Brain-Diffuser never decodes text)",
    "clip.": "CLIP ViT-L/14 towers (the project loads CLIP from its own HF folder, models.clip)",
    "model_ema.": "EMA copy of the UNets (Brain-Diffuser builds vd_noema: use_ema = false, so model.* is loaded)",
}


@dataclass(frozen=True)
class VDArchitecture:
    """The shapes that fix the key layout (defaults: VD v1.0 as in BD configs/model/*.yaml)."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    with_attn: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    context_dim: int = 768
    in_channels: int = 4
    vae_ch: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_z_channels: int = 4

    @classmethod
    def tiny(cls) -> "VDArchitecture":
        """The architecture of ``models.versatile.tiny_versatile`` (tests, demo)."""
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, with_attn=(True, False),
                   num_heads=8, context_dim=32, vae_ch=32,
                   vae_ch_mult=(1, 1, 1, 1), vae_num_res_blocks=1)

    @classmethod
    def infer(cls, sd: dict[str, torch.Tensor], vae_sd: dict[str, torch.Tensor] | None = None,
              num_heads: int = 8) -> "VDArchitecture":
        """Read the sizes from the checkpoint's tensor shapes (VD v1.0 values where a key is absent;
        the missing-key check then names it). The head count is not visible in shapes: VD's 8."""
        d = cls()
        conv_in = sd.get(IMAGE + "input_blocks.0.0.weight")
        if conv_in is None or conv_in.ndim != 4:
            return d
        mc = int(conv_in.shape[0])
        mults, counts, attn, i = [], [0], [], 1
        while True:
            p = f"{IMAGE}input_blocks.{i}"
            if f"{p}.0.op.weight" in sd:
                counts.append(0)
            elif f"{p}.0.in_layers.2.weight" in sd:
                out = int(sd[f"{p}.0.in_layers.2.weight"].shape[0])
                if counts[-1] == 0:
                    mults.append(out // mc)
                    attn.append(f"{p}.1.norm.weight" in sd)
                counts[-1] += 1
            else:
                break
            i += 1
        if not mults:
            return d
        if len(set(counts)) != 1:
            raise UserError(f"the image UNet has {counts} ResBlocks per level; only equal counts convert "
                            "(diffusers' layers_per_block)")
        k = sd.get(next((k for k in sd if k.startswith(IMAGE) and k.endswith("attn2.to_k.weight")), ""), None)
        ctx = int(k.shape[1]) if k is not None else d.context_dim
        v = {kk[len(AUTOKL):]: t for kk, t in sd.items() if kk.startswith(AUTOKL)} if vae_sd is None else vae_sd
        vae = {}
        if "encoder.conv_in.weight" in v and "post_quant_conv.weight" in v:
            ch = int(v["encoder.conv_in.weight"].shape[0])
            vm, n = [], 0
            while f"encoder.down.{n}.block.0.conv1.weight" in v:
                vm.append(int(v[f"encoder.down.{n}.block.0.conv1.weight"].shape[0]) // ch)
                n += 1
            nres = len({kk.split(".")[4] for kk in v if kk.startswith("encoder.down.0.block.")})
            if vm:
                vae = dict(vae_ch=ch, vae_ch_mult=tuple(vm), vae_num_res_blocks=nres,
                           vae_z_channels=int(v["post_quant_conv.weight"].shape[0]))
        return cls(model_channels=mc, channel_mult=tuple(mults), num_res_blocks=counts[0], with_attn=tuple(attn),
                   context_dim=ctx, in_channels=int(conv_in.shape[1]), num_heads=int(num_heads), **vae)

    def unet_config(self) -> dict:
        return dict(
            sample_size=None, in_channels=self.in_channels, out_channels=self.in_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.with_attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.with_attn)),
            block_out_channels=tuple(self.model_channels * m for m in self.channel_mult),
            layers_per_block=self.num_res_blocks, cross_attention_dim=self.context_dim,
            attention_head_dim=self.num_heads,  # diffusers' legacy name: the number of heads (dim = C / 8)
            norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        )

    def vae_config(self) -> dict:
        n = len(self.vae_ch_mult)
        return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n,
                    block_out_channels=tuple(self.vae_ch * m for m in self.vae_ch_mult),
                    layers_per_block=self.vae_num_res_blocks, latent_channels=self.vae_z_channels,
                    norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


# --------------------------------------------------------------------------- the key table
def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    """AutoKL attention: 1×1 Conv2d weight (C, C, 1, 1) → Linear weight (C, C)."""
    return t[:, :, 0, 0] if t.ndim == 4 else t


def _unsqueeze_1x1(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


@dataclass(frozen=True)
class Entry:
    original: str  # key in the .pth
    component: str  # "image_unet" | "vae"
    target: str  # key in that diffusers component's state dict
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # original → diffusers
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None  # diffusers → original


def _wb(orig: str, comp: str, new: str, bias: bool = True, **kw) -> list[Entry]:
    out = [Entry(f"{orig}.weight", comp, f"{new}.weight", **kw)]
    if bias:
        out.append(Entry(f"{orig}.bias", comp, f"{new}.bias"))
    return out


def _resblock(orig: str, new: str, shortcut: bool) -> list[Entry]:
    """ldm ResBlock (in_layers: GN, SiLU, conv3; emb_layers: SiLU, linear; out_layers: GN, SiLU, drop, conv3)."""
    e = (_wb(f"{orig}.in_layers.0", "image_unet", f"{new}.norm1") + _wb(f"{orig}.in_layers.2", "image_unet", f"{new}.conv1")
         + _wb(f"{orig}.emb_layers.1", "image_unet", f"{new}.time_emb_proj")
         + _wb(f"{orig}.out_layers.0", "image_unet", f"{new}.norm2")
         + _wb(f"{orig}.out_layers.3", "image_unet", f"{new}.conv2"))
    if shortcut:  # 1×1 conv skip when the channel count changes
        e += _wb(f"{orig}.skip_connection", "image_unet", f"{new}.conv_shortcut")
    return e


def _transformer(orig: str, new: str) -> list[Entry]:
    """ldm SpatialTransformer (depth 1): GN, 1×1 proj_in, BasicTransformerBlock, 1×1 proj_out.

    q, k, v are separate bias-free Linear layers in this code base (no fused qkv to split).
    """
    c = "image_unet"
    e = _wb(f"{orig}.norm", c, f"{new}.norm") + _wb(f"{orig}.proj_in", c, f"{new}.proj_in")
    b, nb = f"{orig}.transformer_blocks.0", f"{new}.transformer_blocks.0"
    for attn in ("attn1", "attn2"):
        for p in ("to_q", "to_k", "to_v"):
            e += _wb(f"{b}.{attn}.{p}", c, f"{nb}.{attn}.{p}", bias=False)
        e += _wb(f"{b}.{attn}.to_out.0", c, f"{nb}.{attn}.to_out.0")
    for n in ("norm1", "norm2", "norm3"):
        e += _wb(f"{b}.{n}", c, f"{nb}.{n}")
    e += _wb(f"{b}.ff.net.0.proj", c, f"{nb}.ff.net.0.proj") + _wb(f"{b}.ff.net.2", c, f"{nb}.ff.net.2")
    return e + _wb(f"{orig}.proj_out", c, f"{new}.proj_out")


def _slot(position: str, new: str) -> list[Entry]:
    """One dual attention slot: the image transformer → transformers.0, the text one → transformers.1."""
    return _transformer(IMAGE + position, f"{new}.transformers.0") + _transformer(TEXT + position, f"{new}.transformers.1")


def _fcblock_keys(position: str, shortcut: bool) -> list[str]:
    """Keys of one text-UNet FCBlock_MultiDim (same Sequential indices as ResBlock, 1×1 convs)."""
    keys = []
    for m in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3") + (
            ("skip_connection",) if shortcut else ()):
        keys += [f"{TEXT}{position}.{m}.weight", f"{TEXT}{position}.{m}.bias"]
    return keys


def _layout(arch: VDArchitecture) -> tuple[list[Entry], list[str]]:
    """(mapped entries, the text UNet's unused non-attention keys), walking both UNets in step."""
    mc, levels = arch.model_channels, len(arch.channel_mult)
    e: list[Entry] = []
    text_unused: list[str] = []
    e += _wb(UNET + "time_embed.0", "image_unet", "time_embedding.linear_1")
    e += _wb(UNET + "time_embed.2", "image_unet", "time_embedding.linear_2")
    e += _wb(IMAGE + "input_blocks.0.0", "image_unet", "conv_in")
    text_unused += [f"{TEXT}input_blocks.0.0.weight", f"{TEXT}input_blocks.0.0.bias"]
    ch, i, skips = mc, 1, [mc]
    for level, mult in enumerate(arch.channel_mult):
        out = mult * mc
        for j in range(arch.num_res_blocks):
            e += _resblock(f"{IMAGE}input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", ch != out)
            text_unused += _fcblock_keys(f"input_blocks.{i}.0", ch != out)
            if arch.with_attn[level]:
                e += _slot(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}")
            ch = out
            skips.append(ch)
            i += 1
        if level != levels - 1:
            e += _wb(f"{IMAGE}input_blocks.{i}.0.op", "image_unet", f"down_blocks.{level}.downsamplers.0.conv")
            text_unused += [f"{TEXT}input_blocks.{i}.0.weight", f"{TEXT}input_blocks.{i}.0.bias"]  # Linear "downsample"
            skips.append(ch)
            i += 1
    e += _resblock(IMAGE + "middle_block.0", "mid_block.resnets.0", False)
    e += _slot("middle_block.1", "mid_block.attentions.0")
    e += _resblock(IMAGE + "middle_block.2", "mid_block.resnets.1", False)
    text_unused += _fcblock_keys("middle_block.0", False) + _fcblock_keys("middle_block.2", False)
    i = 0
    for up, level in enumerate(reversed(range(levels))):
        out = arch.channel_mult[level] * mc
        for j in range(arch.num_res_blocks + 1):
            cat = ch + skips.pop()
            e += _resblock(f"{IMAGE}output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", cat != out)
            text_unused += _fcblock_keys(f"output_blocks.{i}.0", cat != out)
            k = 1
            if arch.with_attn[level]:
                e += _slot(f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}")
                k = 2
            if level != 0 and j == arch.num_res_blocks:
                e += _wb(f"{IMAGE}output_blocks.{i}.{k}.conv", "image_unet", f"up_blocks.{up}.upsamplers.0.conv")
                text_unused += [f"{TEXT}output_blocks.{i}.{k}.weight", f"{TEXT}output_blocks.{i}.{k}.bias"]
            ch = out
            i += 1
    e += _wb(IMAGE + "out.0", "image_unet", "conv_norm_out") + _wb(IMAGE + "out.2", "image_unet", "conv_out")
    text_unused += [f"{TEXT}out.0.weight", f"{TEXT}out.0.bias", f"{TEXT}out.2.weight", f"{TEXT}out.2.bias"]
    return e + _vae_entries(arch), text_unused


def _vae_resnet(orig: str, new: str, shortcut: bool) -> list[Entry]:
    e = []
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")):
        e += _wb(f"{orig}.{a}", "vae", f"{new}.{b}")
    if shortcut:
        e += _wb(f"{orig}.nin_shortcut", "vae", f"{new}.conv_shortcut")
    return e


def _vae_attention(orig: str, new: str) -> list[Entry]:
    """ldm AttnBlock (GN + 1×1 conv q, k, v, proj_out; one head) → diffusers Attention (Linear to_*)."""
    e = _wb(f"{orig}.norm", "vae", f"{new}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        e += [Entry(f"{orig}.{a}.weight", "vae", f"{new}.{b}.weight", _squeeze_1x1, _unsqueeze_1x1),
              Entry(f"{orig}.{a}.bias", "vae", f"{new}.{b}.bias")]
    return e


def _vae_entries(arch: VDArchitecture) -> list[Entry]:
    A, ch, mult, n = AUTOKL, arch.vae_ch, arch.vae_ch_mult, len(arch.vae_ch_mult)
    e = _wb(A + "encoder.conv_in", "vae", "encoder.conv_in")
    block_in = ch
    for i in range(n):
        block_out = ch * mult[i]
        for j in range(arch.vae_num_res_blocks):
            e += _vae_resnet(f"{A}encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", block_in != block_out)
            block_in = block_out
        if i != n - 1:
            e += _wb(f"{A}encoder.down.{i}.downsample.conv", "vae", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for part in ("encoder", "decoder"):
        if part == "decoder":
            e += _wb(A + "decoder.conv_in", "vae", "decoder.conv_in")
        e += _vae_resnet(f"{A}{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        e += _vae_attention(f"{A}{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        e += _vae_resnet(f"{A}{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
        if part == "encoder":
            e += _wb(A + "encoder.norm_out", "vae", "encoder.conv_norm_out")
            e += _wb(A + "encoder.conv_out", "vae", "encoder.conv_out")
    block_in = ch * mult[-1]
    for up in range(n):  # diffusers counts the decoder from the bottom; ldm's up.{level} from the top
        level = n - 1 - up
        block_out = ch * mult[level]
        for j in range(arch.vae_num_res_blocks + 1):
            e += _vae_resnet(f"{A}decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", block_in != block_out)
            block_in = block_out
        if level != 0:
            e += _wb(f"{A}decoder.up.{level}.upsample.conv", "vae", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    e += _wb(A + "decoder.norm_out", "vae", "decoder.conv_norm_out") + _wb(A + "decoder.conv_out", "vae", "decoder.conv_out")
    e += _wb(A + "quant_conv", "vae", "quant_conv") + _wb(A + "post_quant_conv", "vae", "post_quant_conv")
    return e


def key_table(arch: VDArchitecture | None = None) -> list[Entry]:
    """Every mapped key: original name → (component, diffusers name, tensor transform)."""
    return _layout(arch or VDArchitecture())[0]


def unused_keys(arch: VDArchitecture | None = None) -> list[str]:
    """The exact keys of the text UNet's text-generation layers (everything but its transformers)."""
    return _layout(arch or VDArchitecture())[1]


def _text_module(key: str) -> str | None:
    """The text-UNet module position of a key (``unet_text.input_blocks.4.0``, ``unet_text.out.2``)."""
    if not key.startswith(TEXT):
        return None
    parts = key[len(TEXT):].split(".")
    n = 3 if parts[0] in ("input_blocks", "output_blocks") else 2
    return TEXT + ".".join(parts[:n]) if len(parts) > n else None


def unused_reason(key: str, text_unused: set[str]) -> str | None:
    """Why a key is deliberately unused, or None. ``text_unused``: the expected text-flow keys; any
    key of the same text-UNet *modules* counts too (e.g. a skip connection that another second_dim
    would add), never one of the transformer slots."""
    text_modules = {_text_module(k) for k in text_unused}
    if key in text_unused or (_text_module(key) is not None and _text_module(key) in text_modules):
        return "text UNet's text-flow layer (FC block / linear / output head): Brain-Diffuser runs only its transformers"
    if key in SCHEDULE_BUFFERS:
        return "DDPM schedule buffer (rebuilt from VD's constants; checked against them)"
    for prefix, why in UNUSED_PREFIXES.items():
        if key.startswith(prefix):
            return why
    return None


# --------------------------------------------------------------------------- reading the checkpoint
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a .pth, loaded with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # truncated zip, not a torch file, or a pickle needing code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable torch checkpoint (truncated or not a .pth? {first[:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path}: expected a flat state dict of tensors (the original VD layout)")
    return sd


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _short(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


@dataclass
class Classified:
    mapped: list[Entry]
    unused: dict[str, str]  # key → reason
    missing: list[str]
    unknown: list[str]


def classify(sd: dict[str, torch.Tensor], arch: VDArchitecture | None = None,
             vae_sd: dict[str, torch.Tensor] | None = None) -> Classified:
    """Sort the checkpoint's keys. ``vae_sd`` (kl-f8.pth, unprefixed) supplies/overrides ``autokl.*``."""
    arch = arch or VDArchitecture()
    table, text_unused = _layout(arch)
    text_unused = set(text_unused)
    keys = set(sd)
    if vae_sd is not None:
        keys |= {AUTOKL + k for k in vae_sd}
    mapped_names = {e.original for e in table}
    unused, unknown = {}, []
    for k in keys - mapped_names:
        why = unused_reason(k, text_unused)
        if why is None:
            unknown.append(k)
        else:
            unused[k] = why
    missing = sorted(mapped_names - keys)
    return Classified(mapped=table, unused=unused, missing=missing, unknown=sorted(unknown))


def convert_state_dicts(sd: dict[str, torch.Tensor], arch: VDArchitecture | None = None,
                        vae_sd: dict[str, torch.Tensor] | None = None, source: str = "checkpoint"
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """{component: diffusers state dict}; unknown or missing keys are a UserError listing them."""
    c = classify(sd, arch, vae_sd)
    if c.unknown:
        raise UserError(f"{source}: {len(c.unknown)} key(s) neither mapped nor known to be unused "
                        f"(not the original VD four-flow layout?): {_short(c.unknown)}")
    if c.missing:
        raise UserError(f"{source}: {len(c.missing)} key(s) missing: {_short(c.missing)}"
                        + ("; the AutoKL can come from kl-f8.pth (--vae)" if any(m.startswith(AUTOKL) for m in c.missing) else ""))
    out: dict[str, dict[str, torch.Tensor]] = {"image_unet": {}, "vae": {}}
    for e in c.mapped:
        if vae_sd is not None and e.original.startswith(AUTOKL):
            t = vae_sd[e.original[len(AUTOKL):]]
        else:
            t = sd[e.original]
        out[e.component][e.target] = e.transform(t) if e.transform else t
    return out


def to_original(components, arch: VDArchitecture | None = None) -> dict[str, torch.Tensor]:
    """The inverse: diffusers components (dual image UNet + VAE) → a state dict in the original layout.

    Only the mapped keys are produced (the unused ones are not recoverable); used by the round-trip test.
    """
    sds = {"image_unet": components.image_unet.state_dict(), "vae": components.vae.state_dict()}
    out = {}
    for e in key_table(arch):
        t = sds[e.component][e.target]
        out[e.original] = e.inverse(t) if e.inverse else t
    return out


# --------------------------------------------------------------------------- building components
def build_components(converted: dict[str, dict[str, torch.Tensor]], arch: VDArchitecture | None = None,
                     source: str = "checkpoint"):
    """VersatileComponents (dual image UNet, AutoencoderKL, VD scheduler) holding the converted weights."""
    from models.versatile import VersatileComponents, vd_scheduler

    arch = arch or VDArchitecture()
    unet, vae = empty_models(arch)
    for model, name in ((unet, "image_unet"), (vae, "vae")):
        sd = {k: v.to(torch.float32).contiguous() for k, v in converted[name].items()}
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as exc:  # shape mismatch: another architecture than VDArchitecture
            msg = " ".join(str(exc).split())
            raise UserError(f"{source}: {name} tensors do not fit the VD architecture ({msg[:300]})") from None
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:  # a tensor the state dict does not carry (would stay uninitialised)
            raise RuntimeError(f"{name}: tensors not set from the checkpoint: {_short(left)}")
    return VersatileComponents(vae=vae.eval(), image_unet=unet.eval(), scheduler=vd_scheduler())


def empty_models(arch: VDArchitecture):
    """(dual image UNet, AutoencoderKL) of ``arch`` on the meta device (no memory, no random init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from models.versatile import apply_dual_transformer_patch, dual_transformer_like

    apply_dual_transformer_patch()
    with torch.device("meta"):  # no random init of 860M parameters: every tensor comes from the checkpoint
        unet = UNet2DConditionModel(**arch.unet_config())
        vae = AutoencoderKL(**arch.vae_config())
    for name in [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]:
        parent, index = name.rsplit(".", 1)
        image_tf = unet.get_submodule(parent)[int(index)]
        with torch.device("meta"):
            dual = dual_transformer_like(image_tf)
        dual.transformers[0] = image_tf
        dual.transformers[1] = copy.deepcopy(image_tf)
        unet.get_submodule(parent)[int(index)] = dual
    unet.register_to_config(dual_cross_attention=True)
    return unet, vae


def check_schedule(sd: dict[str, torch.Tensor], source: str) -> None:
    """If the checkpoint carries VD's ``betas`` buffer, it must be VD's scaled-linear schedule."""
    if "betas" not in sd:
        return
    from models.versatile import VD_BETA_END, VD_BETA_START, VD_NUM_TRAIN_TIMESTEPS

    expected = torch.linspace(VD_BETA_START ** 0.5, VD_BETA_END ** 0.5, VD_NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    got = sd["betas"].to(torch.float64)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-7):
        raise UserError(f"{source}: its betas buffer is not Versatile Diffusion's schedule "
                        f"(scaled_linear {VD_BETA_START}–{VD_BETA_END}, {VD_NUM_TRAIN_TIMESTEPS} steps)")


def load_pth(path: str | Path, vae: str | Path | None = None, arch: VDArchitecture | None = None,
             num_heads: int = 8):
    """Original-layout .pth (+ optional kl-f8.pth) → VersatileComponents, in memory."""
    sd = read_checkpoint(path)
    vae_sd = read_checkpoint(vae) if vae else None
    arch = arch or VDArchitecture.infer(sd, vae_sd, num_heads)
    check_schedule(sd, str(path))
    converted = convert_state_dicts(sd, arch, vae_sd, source=str(path))
    del sd, vae_sd
    return build_components(converted, arch, source=str(path))


def convert(path: str | Path, out_dir: str | Path, vae: str | Path | None = None, dtype: str = "float16",
            arch: VDArchitecture | None = None, num_heads: int = 8) -> Path:
    """Write the diffusers folder ``models.versatile.load_versatile`` reads (vae/, image_unet/, scheduler/)."""
    from models.versatile import save_versatile

    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: expected float16 or float32")
    components = load_pth(path, vae, arch, num_heads)
    if dtype == "float16":  # the checkpoint's own precision: the same bits as the .pth
        components.image_unet.to(torch.float16)
        components.vae.to(torch.float16)
    return save_versatile(components, out_dir)


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.vd_convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write a diffusers-format folder from the original .pth")
    c.add_argument("pth")
    c.add_argument("out_dir")
    c.add_argument("--vae", help="kl-f8.pth (unprefixed AutoKL keys), if the .pth lacks autokl.* or to override it")
    c.add_argument("--dtype", default="float16", help="float16 (the checkpoint's precision, default) or float32")
    c.add_argument("--heads", type=int, default=8, help="attention heads per transformer (VD: 8; not visible in shapes)")
    sub.add_parser("table", help="print the full key mapping of VD v1.0 (markdown)")
    k = sub.add_parser("keys", help="classify the checkpoint's keys (mapped / unused / unknown / missing)")
    k.add_argument("pth")
    k.add_argument("--vae")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "table":
            table, text_unused = _layout(VDArchitecture())
            print("| original key (.pth) | component | diffusers key | transform |\n|---|---|---|---|")
            for e in table:
                print(f"| `{e.original}` | {e.component} | `{e.target}` | {'1×1 conv → linear' if e.transform else ''} |")
            for key in text_unused:
                print(f"| `{key}` | unused | | text-flow layer |")
            return 0
        if args.cmd == "convert":
            out = convert(args.pth, args.out_dir, args.vae, args.dtype, num_heads=args.heads)
            print(f"wrote {out} (vae/, image_unet/ with dual attention, scheduler/); "
                  f"set models.versatile = \"{out}\"")
        else:
            sd = read_checkpoint(args.pth)
            vae_sd = read_checkpoint(args.vae) if args.vae else None
            cl = classify(sd, VDArchitecture.infer(sd, vae_sd), vae_sd)
            print(f"mapped {len(cl.mapped)}  unused {len(cl.unused)}  unknown {len(cl.unknown)}  missing {len(cl.missing)}")
            reasons: dict[str, int] = {}
            for why in cl.unused.values():
                reasons[why] = reasons.get(why, 0) + 1
            for why, count in sorted(reasons.items()):
                print(f"  unused {count:5d}: {why}")
            for name, keys in (("unknown", cl.unknown), ("missing", cl.missing)):
                for key in keys:
                    print(f"  {name}: {key}")
            return 0 if not (cl.unknown or cl.missing) else 2
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
