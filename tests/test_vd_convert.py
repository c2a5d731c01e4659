"""models/vd_convert.py: the original Versatile Diffusion (.pth) layout → the project's diffusers components.

The reference here is an independent functional forward pass written from the original VD code
(``openaimodel.py`` UNetModelVD.forward_dc / ResBlock, ``attention.py`` SpatialTransformer,
ldm's AutoencoderKL Encoder/Decoder), run directly on the original-layout tensors of a tiny random
checkpoint; it walks the modules by their key names, so it does not use the converter's table.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import vd_convert as vc
from models.versatile import load_versatile, set_dual_mixing, tiny_versatile
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCH = vc.VDArchitecture.tiny()


def _randomise(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random (norm scales around 1), so no zero-initialised layer hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in sorted(sd.items()):
        r = torch.randn(t.shape, generator=g)
        is_norm_weight = k.endswith(".weight") and t.ndim == 1
        out[k] = (1.0 + 0.1 * r) if is_norm_weight else 0.15 * r
    return out


def tiny_original_checkpoint(seed: int = 0, fp16: bool = True) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the original four-flow key layout, with random values, plus the keys the
    converter must ignore (text-flow layers, Optimus, CLIP, schedule buffers, EMA copies)."""
    mapped = vc.to_original(tiny_versatile(seed=seed), ARCH)
    sd = _randomise(mapped, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k in vc.unused_keys(ARCH):  # text UNet FC blocks etc. (their shapes do not matter here)
        sd[k] = torch.randn(3, 2, generator=g)
    sd["optimus.encoder.embeddings.word_embeddings.weight"] = torch.randn(5, 4, generator=g)
    sd["optimus.decoder.transformer.h.0.attn.c_attn.weight"] = torch.randn(4, 12, generator=g)
    sd["clip.model.text_model.embeddings.token_embedding.weight"] = torch.randn(7, 4, generator=g)
    sd["clip.model.vision_model.embeddings.class_embedding"] = torch.randn(4, generator=g)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelunet_imageinput_blocks00weight"] = torch.randn(2, generator=g)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    if fp16:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- independent reference
def _gn(sd, p, x, eps):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _conv(sd, p, x, stride=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2 if stride == 1 else 1)


def _lin(sd, p, x):
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def ref_resblock(sd, p, x, emb):
    h = _conv(sd, f"{p}.in_layers.2", F.silu(_gn(sd, f"{p}.in_layers.0", x, 1e-5)))
    h = h + _lin(sd, f"{p}.emb_layers.1", F.silu(emb))[:, :, None, None]
    h = _conv(sd, f"{p}.out_layers.3", F.silu(_gn(sd, f"{p}.out_layers.0", h, 1e-5)))
    skip = _conv(sd, f"{p}.skip_connection", x) if f"{p}.skip_connection.weight" in sd else x
    return skip + h


def _attention(sd, p, x, ctx, heads):
    q, k, v = _lin(sd, f"{p}.to_q", x), _lin(sd, f"{p}.to_k", ctx), _lin(sd, f"{p}.to_v", ctx)
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, inner)
    return _lin(sd, f"{p}.to_out.0", out)


def ref_spatial_transformer(sd, p, x, ctx, heads=8):
    b, c, hh, ww = x.shape
    h = _conv(sd, f"{p}.proj_in", _gn(sd, f"{p}.norm", x, 1e-6)).flatten(2).transpose(1, 2)
    t = f"{p}.transformer_blocks.0"

    def ln(name, z):
        return F.layer_norm(z, (z.shape[-1],), sd[f"{t}.{name}.weight"], sd[f"{t}.{name}.bias"], 1e-5)

    h = _attention(sd, f"{t}.attn1", ln("norm1", h), ln("norm1", h), heads) + h
    h = _attention(sd, f"{t}.attn2", ln("norm2", h), ctx, heads) + h
    a, gate = _lin(sd, f"{t}.ff.net.0.proj", ln("norm3", h)).chunk(2, dim=-1)
    h = _lin(sd, f"{t}.ff.net.2", a * F.gelu(gate)) + h
    h = h.transpose(1, 2).reshape(b, c, hh, ww)
    return _conv(sd, f"{p}.proj_out", h) + x


def _indices(sd, prefix):
    return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})


def ref_unet_dc(sd, x, t, vision, text, mixed_ratio=0.6):
    """UNetModelVD.forward_dc with xtype image, c0 = vision, c1 = text (Brain-Diffuser's call)."""
    U, I = "model.diffusion_model.", "model.diffusion_model.unet_image."
    mc = sd[I + "input_blocks.0.0.weight"].shape[0]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = _lin(sd, U + "time_embed.2", F.silu(_lin(sd, U + "time_embed.0", emb)))

    def run(block, h):
        for m in _indices(sd, block + "."):
            p = f"{block}.{m}"
            if f"{p}.in_layers.0.weight" in sd:
                h = ref_resblock(sd, p, h, emb)
            elif f"{p}.proj_in.weight" in sd:  # image transformer on vision, text UNet's twin on text
                tp = p.replace(".unet_image.", ".unet_text.")
                h0 = ref_spatial_transformer(sd, p, h, vision) - h
                h1 = ref_spatial_transformer(sd, tp, h, text) - h
                h = h0 * mixed_ratio + h1 * (1 - mixed_ratio) + h
            elif f"{p}.op.weight" in sd:
                h = _conv(sd, f"{p}.op", h, stride=2)
            elif f"{p}.conv.weight" in sd:
                h = _conv(sd, f"{p}.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
            else:
                h = _conv(sd, p, h)
        return h

    hs, h = [], x
    for i in _indices(sd, I + "input_blocks."):
        h = run(f"{I}input_blocks.{i}", h)
        hs.append(h)
    h = run(I + "middle_block", h)
    for i in _indices(sd, I + "output_blocks."):
        h = run(f"{I}output_blocks.{i}", torch.cat([h, hs.pop()], dim=1))
    return _conv(sd, I + "out.2", F.silu(_gn(sd, I + "out.0", h, 1e-5)))


def _vres(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x, 1e-6)))
    h = _conv(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h, 1e-6)))
    return (_conv(sd, f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _vattn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, f"{p}.norm", x, 1e-6)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in ("q", "k", "v"))
    w = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=2)  # (b, hw_q, hw_k)
    h = (v @ w.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", h)


def ref_vae_encode_mean(sd, x):
    A = "autokl.encoder."
    h = _conv(sd, A + "conv_in", x)
    for i in _indices(sd, A + "down."):
        for j in _indices(sd, f"{A}down.{i}.block."):
            h = _vres(sd, f"{A}down.{i}.block.{j}", h)
        if f"{A}down.{i}.downsample.conv.weight" in sd:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[f"{A}down.{i}.downsample.conv.weight"],
                         sd[f"{A}down.{i}.downsample.conv.bias"], stride=2)
    h = _vres(sd, A + "mid.block_2", _vattn(sd, A + "mid.attn_1", _vres(sd, A + "mid.block_1", h)))
    h = _conv(sd, A + "conv_out", F.silu(_gn(sd, A + "norm_out", h, 1e-6)))
    moments = _conv(sd, "autokl.quant_conv", h)
    return moments.chunk(2, dim=1)[0]


def ref_vae_decode(sd, z):
    A = "autokl.decoder."
    h = _conv(sd, A + "conv_in", _conv(sd, "autokl.post_quant_conv", z))
    h = _vres(sd, A + "mid.block_2", _vattn(sd, A + "mid.attn_1", _vres(sd, A + "mid.block_1", h)))
    for level in reversed(_indices(sd, A + "up.")):
        for j in _indices(sd, f"{A}up.{level}.block."):
            h = _vres(sd, f"{A}up.{level}.block.{j}", h)
        if f"{A}up.{level}.upsample.conv.weight" in sd:
            h = _conv(sd, f"{A}up.{level}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    return _conv(sd, A + "conv_out", F.silu(_gn(sd, A + "norm_out", h, 1e-6)))


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def original():
    return tiny_original_checkpoint(seed=3)


@pytest.fixture(scope="module")
def converted(original):
    arch = vc.VDArchitecture.infer(original)
    assert arch == ARCH  # sizes read back from the shapes
    comps = vc.build_components(vc.convert_state_dicts(original, arch), arch)
    return comps


def test_every_key_is_mapped_or_deliberately_unused(original):
    c = vc.classify(original, ARCH)
    assert not c.unknown and not c.missing
    assert len(c.mapped) + len(c.unused) == len(original)
    assert len({e.original for e in c.mapped}) == len(c.mapped)  # no key mapped twice
    targets = {(e.component, e.target) for e in c.mapped}
    assert len(targets) == len(c.mapped)  # no diffusers tensor written twice
    # every tensor of the diffusers components is set from the checkpoint
    comps = tiny_versatile(seed=0)
    assert targets == ({("image_unet", k) for k in comps.image_unet.state_dict()}
                       | {("vae", k) for k in comps.vae.state_dict()})
    assert any("Optimus" in why for why in c.unused.values()) and any("CLIP" in why for why in c.unused.values())


def test_real_architecture_table_counts():
    table, text_unused = vc._layout(vc.VDArchitecture())
    unet = [e for e in table if e.component == "image_unet"]
    slots = {e.target.split(".transformers.")[0] for e in unet if ".transformers." in e.target}
    assert len(slots) == 16  # SD-1.x: 6 down + 1 mid + 9 up attention slots, each dual
    assert sum(".transformers.1." in e.target for e in unet) == sum(".transformers.0." in e.target for e in unet)
    assert all(e.original.startswith(vc.TEXT) for e in unet if ".transformers.1." in e.target)
    assert all(e.original.startswith(vc.IMAGE) for e in unet if ".transformers.0." in e.target)
    assert all(k.startswith(vc.TEXT) for k in text_unused)


def test_unet_forward_equals_the_original_dual_context_forward(original, converted):
    sd = {k: v.float() for k, v in original.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([721, 41])
    vision, text = torch.randn(2, 5, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        expected = ref_unet_dc(sd, x, t, vision, text, mixed_ratio=0.6)
        unet = converted.image_unet
        set_dual_mixing(unet, mix_text=0.4, text_len=3, image_len=5)
        got = unet(x, t, encoder_hidden_states=torch.cat([text, vision], dim=1)).sample
        # the placement matters: swapping the text/vision roles gives another output
        swapped = ref_unet_dc(sd, x, t, vision, text, mixed_ratio=0.4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (swapped - expected).abs().max() > 1e-2


def test_one_block_by_hand(original, converted):
    """A single SpatialTransformer and ResBlock, from the original tensors, against the converted modules."""
    sd = {k: v.float() for k, v in original.items()}
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 32, 4, 4, generator=g)
    ctx = torch.randn(2, 6, 32, generator=g)
    emb = torch.randn(2, 128, generator=g)
    unet = converted.image_unet
    dual = unet.down_blocks[0].attentions[0]
    with torch.no_grad():
        for slot, prefix in ((0, vc.IMAGE), (1, vc.TEXT)):
            got = dual.transformers[slot](h, encoder_hidden_states=ctx, return_dict=False)[0]
            torch.testing.assert_close(got, ref_spatial_transformer(sd, prefix + "input_blocks.1.1", h, ctx),
                                       rtol=1e-4, atol=1e-4)
        got = unet.down_blocks[0].resnets[0](h, emb)
        torch.testing.assert_close(got, ref_resblock(sd, vc.IMAGE + "input_blocks.1.0", h, emb), rtol=1e-4, atol=1e-4)


def test_vae_equals_the_original_autokl(original, converted):
    sd = {k: v.float() for k, v in original.items()}
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(converted.vae.encode(x).latent_dist.mean, ref_vae_encode_mean(sd, x),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(converted.vae.decode(z).sample, ref_vae_decode(sd, z), rtol=1e-4, atol=1e-4)


def test_round_trip_and_cli_folder(tmp_path, original, converted):
    # diffusers → original layout → diffusers: bit-identical tensors
    back = vc.to_original(converted, ARCH)
    for k, v in back.items():
        assert torch.equal(v.half(), original[k]), k
    again = vc.convert_state_dicts({**original, **{k: v.half() for k, v in back.items()}}, ARCH)
    for comp, module in (("image_unet", converted.image_unet), ("vae", converted.vae)):
        sd = module.state_dict()
        assert set(again[comp]) == set(sd)
        for k, v in again[comp].items():
            assert torch.equal(v.float(), sd[k]), k
    # the CLI writes a folder load_versatile reads; pointing it at the .pth converts on the fly
    pth = tmp_path / "vd-tiny.pth"
    torch.save(original, pth)
    out = tmp_path / "vd"
    assert vc.main(["convert", str(pth), str(out), "--dtype", "float32"]) == 0
    for loaded in (load_versatile(out), load_versatile(pth)):
        for a, b in ((loaded.image_unet, converted.image_unet), (loaded.vae, converted.vae)):
            sa, sb = a.state_dict(), b.state_dict()
            assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert vc.main(["keys", str(pth)]) == 0


def test_vae_from_its_own_file(tmp_path, original):
    vae_sd = {k[len("autokl."):]: v for k, v in original.items() if k.startswith("autokl.")}
    without = {k: v for k, v in original.items() if not k.startswith("autokl.")}
    with pytest.raises(UserError, match=r"missing: autokl\..*kl-f8.pth"):
        vc.convert_state_dicts(without, ARCH, source="x.pth")
    conv = vc.convert_state_dicts(without, ARCH, vae_sd=vae_sd)
    assert torch.equal(conv["vae"]["quant_conv.weight"], original["autokl.quant_conv.weight"])


def test_bad_checkpoints_are_one_line_errors(tmp_path, original):
    extra = dict(original)
    extra["model.diffusion_model.unet_image.input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"1 key\(s\) neither mapped.*input_blocks\.99") as e:
        vc.convert_state_dicts(extra, ARCH, source="bad.pth")
    assert "\n" not in str(e.value)
    # a key inside a transformer slot of the text UNet is not swallowed by the text-flow rule
    odd = dict(original)
    odd[vc.TEXT + "input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="attn3"):
        vc.convert_state_dicts(odd, ARCH)
    # while another key of a text-flow module (e.g. a skip connection another second_dim adds) is unused
    tolerant = dict(original)
    tolerant[vc.TEXT + "input_blocks.1.0.skip_connection.weight"] = torch.zeros(1)
    assert "text-flow" in vc.classify(tolerant, ARCH).unused[vc.TEXT + "input_blocks.1.0.skip_connection.weight"]
    missing = dict(original)
    del missing[vc.IMAGE + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    del missing[vc.TEXT + "middle_block.1.proj_out.bias"]
    with pytest.raises(UserError, match=r"2 key\(s\) missing: .*attn2\.to_k\.weight"):
        vc.convert_state_dicts(missing, ARCH, source="bad.pth")
    pth = tmp_path / "good.pth"
    torch.save(original, pth)
    data = pth.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable torch checkpoint") as e:
        vc.read_checkpoint(truncated)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        vc.read_checkpoint(tmp_path / "absent.pth")
    torch.save({"a": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="flat state dict"):
        vc.read_checkpoint(tmp_path / "odd.pth")
    wrong_shape = dict(original)
    wrong_shape[vc.IMAGE + "out.2.bias"] = torch.zeros(5, dtype=torch.float16)
    with pytest.raises(UserError, match="do not fit"):
        vc.build_components(vc.convert_state_dicts(wrong_shape, ARCH), ARCH, source="bad.pth")
    bad_betas = dict(original)
    bad_betas["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    torch.save(bad_betas, tmp_path / "betas.pth")
    with pytest.raises(UserError, match="schedule"):
        vc.load_pth(tmp_path / "betas.pth")
    # the CLI: exit 2 and one line
    assert vc.main(["convert", str(truncated), str(tmp_path / "o")]) == 2


def test_real_size_table_covers_the_real_diffusers_models():
    """For VD v1.0's sizes (on the meta device), the table sets exactly every tensor of the models."""
    arch = vc.VDArchitecture()
    unet, vae = vc.empty_models(arch)
    table = vc.key_table(arch)
    assert {e.target for e in table if e.component == "image_unet"} == set(unet.state_dict())
    assert {e.target for e in table if e.component == "vae"} == set(vae.state_dict())
    n_unet = sum(t.numel() for t in unet.state_dict().values())
    assert 1.08e9 < n_unet < 1.17e9  # 860M image UNet + 16 text transformers (1,126,760,324)
    assert vc.main(["table"]) == 0
