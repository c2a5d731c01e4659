"""Tests for models/vdvae.py on the tiny config (plus shape-only checks of the real config)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.vdvae import (
    CHECKPOINT_URL,
    VDVAE,
    PerImageNoise,
    VDVAEConfig,
    decode_latents,
    extract_latents,
    latent_dim,
    latent_shapes,
    load_vdvae,
    preprocess,
    random_init_,
    sample_dmol,
    split_latents,
)
from pipeline.errors import UserError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return random_init_(VDVAE(VDVAEConfig.tiny()), seed=0).eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, size=(5, 72, 80, 3), dtype=np.uint8)


# (a) the real architecture ------------------------------------------------------------------


def test_imagenet64_state_dict_layout():
    with torch.device("meta"):
        model = VDVAE(VDVAEConfig.imagenet64())
    sd = model.state_dict()
    assert len(sd) == 2482
    assert sum(v.numel() for v in sd.values()) == 125_005_860
    expected = {
        "encoder.in_conv.weight": (512, 3, 3, 3),
        "encoder.enc_blocks.0.c1.weight": (128, 512, 1, 1),
        "encoder.enc_blocks.0.c2.weight": (128, 128, 3, 3),
        "encoder.enc_blocks.59.c3.weight": (128, 128, 3, 3),
        "encoder.enc_blocks.60.c2.weight": (128, 128, 1, 1),
        "encoder.enc_blocks.64.c4.weight": (512, 128, 1, 1),
        "encoder.enc_blocks.64.c4.bias": (512,),
        "decoder.dec_blocks.0.enc.c1.weight": (128, 1024, 1, 1),
        "decoder.dec_blocks.1.enc.c2.weight": (128, 128, 1, 1),
        "decoder.dec_blocks.2.enc.c2.weight": (128, 128, 3, 3),
        "decoder.dec_blocks.74.enc.c4.weight": (32, 128, 1, 1),
        "decoder.dec_blocks.30.prior.c1.weight": (128, 512, 1, 1),
        "decoder.dec_blocks.30.prior.c4.weight": (544, 128, 1, 1),
        "decoder.dec_blocks.12.z_proj.weight": (512, 16, 1, 1),
        "decoder.dec_blocks.12.resnet.c4.weight": (512, 128, 1, 1),
        "decoder.bias_xs.0": (1, 512, 1, 1),
        "decoder.bias_xs.1": (1, 512, 4, 4),
        "decoder.bias_xs.5": (1, 512, 64, 64),
        "decoder.gain": (1, 512, 1, 1),
        "decoder.bias": (1, 512, 1, 1),
        "decoder.out_net.out_conv.weight": (100, 512, 1, 1),
        "decoder.out_net.out_conv.bias": (100,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.bias_xs.6" not in sd and "encoder.enc_blocks.65.c1.weight" not in sd
    assert "decoder.dec_blocks.74.resnet.c1.bias" in sd and "decoder.dec_blocks.75.enc.c1.weight" not in sd


# (b) loading ---------------------------------------------------------------------------------


def test_load_round_trip_th_safetensors_and_module_prefix(tmp_path, tiny, images):
    from safetensors.torch import save_file

    sd = tiny.state_dict()
    torch.save(sd, tmp_path / "m.th")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "wrapped.th")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    want = extract_latents(tiny, images, n_groups=None, seed=3)
    for name in ("m.th", "wrapped.th", "m.safetensors"):
        loaded = load_vdvae(tmp_path / name, config=VDVAEConfig.tiny())
        assert not loaded.training
        assert loaded.state_dict().keys() == sd.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
        # same weights, same seed; another module instance may round differently by an ulp on some CPUs
        np.testing.assert_allclose(extract_latents(loaded, images, seed=3), want, rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path, tiny):
    sd = tiny.state_dict()
    with pytest.raises(UserError, match=r"nothere\.th.*very-deep-vaes-assets.*imagenet64-iter-1600000-model-ema\.th"):
        load_vdvae(tmp_path / "nothere.th", config=VDVAEConfig.tiny())
    assert "imagenet64-iter-1600000-model-ema.th" in CHECKPOINT_URL

    renamed = dict(sd)
    renamed["decoder.gainz"] = renamed.pop("decoder.gain")
    torch.save(renamed, tmp_path / "renamed.th")
    with pytest.raises(UserError, match=r"renamed\.th.*missing 1: decoder\.gain;.*unexpected 1: decoder\.gainz"):
        load_vdvae(tmp_path / "renamed.th", config=VDVAEConfig.tiny())

    reshaped = dict(sd)
    reshaped["decoder.dec_blocks.0.z_proj.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(reshaped, tmp_path / "reshaped.th")
    with pytest.raises(UserError, match=r"wrong shape 1: decoder\.dec_blocks\.0\.z_proj\.weight"):
        load_vdvae(tmp_path / "reshaped.th", config=VDVAEConfig.tiny())

    # the tiny checkpoint does not fit the real architecture: many mismatches, listed briefly
    torch.save(sd, tmp_path / "tiny.th")
    with pytest.raises(UserError, match=r"more\)"):
        load_vdvae(tmp_path / "tiny.th")

    (tmp_path / "garbage.th").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.th"):
        load_vdvae(tmp_path / "garbage.th", config=VDVAEConfig.tiny())


# (c) latent dimensions -------------------------------------------------------------------------


def test_latent_shapes_real_config():
    shapes = latent_shapes(VDVAEConfig.imagenet64(), 31)
    assert shapes == [(16, 1, 1)] * 2 + [(16, 4, 4)] * 4 + [(16, 8, 8)] * 8 + [(16, 16, 16)] * 16 + [(16, 32, 32)]
    assert sum(math.prod(s) for s in shapes) == 91_168 == latent_dim(VDVAEConfig.imagenet64())
    assert latent_dim(VDVAEConfig.imagenet64(), 75) == 1_451_040
    with pytest.raises(UserError, match="n_groups=76"):
        latent_shapes(VDVAEConfig.imagenet64(), 76)


def test_tiny_latent_dims_and_split(tiny, images):
    cfg = VDVAEConfig.tiny()
    for n_groups in (1, 3, cfg.n_latent_groups, len(cfg.decoder_layers())):
        shapes = latent_shapes(cfg, n_groups)
        z = extract_latents(tiny, images[:2], n_groups=n_groups)
        assert z.shape == (2, sum(math.prod(s) for s in shapes)) and z.dtype == np.float32
        parts = split_latents(z, shapes)
        assert [p.shape[1:] for p in parts] == shapes
        np.testing.assert_array_equal(np.concatenate([p.reshape(2, -1) for p in parts], axis=1), z)
    with pytest.raises(UserError, match="expected"):
        split_latents(np.zeros((2, 5)), shapes)


# (d) extraction ---------------------------------------------------------------------------------


def test_extraction_seeding(tiny, images):
    cfg = VDVAEConfig.tiny()
    a = extract_latents(tiny, images, seed=7, batch_size=2)
    np.testing.assert_array_equal(a, extract_latents(tiny, images, seed=7, batch_size=2))
    assert not np.allclose(a, extract_latents(tiny, images, seed=8, batch_size=2))
    # batch composition does not matter: bigger batch, and one image alone with its own seed
    np.testing.assert_allclose(extract_latents(tiny, images, seed=7, batch_size=5), a, atol=1e-5)
    np.testing.assert_allclose(extract_latents(tiny, images[3:4], seeds=[10]), a[3:4], atol=1e-5)
    # posterior means: seed-free, and the sample of group 0 is mean + positive std * eps(seed + i)
    m = extract_latents(tiny, images, posterior="mean", seed=1)
    np.testing.assert_allclose(m, extract_latents(tiny, images, posterior="mean", seed=2), atol=1e-6)
    zdim = cfg.zdim
    for i in range(len(images)):
        eps = torch.randn((zdim, 1, 1), generator=torch.Generator().manual_seed(7 + i)).numpy().ravel()
        std = (a[i, :zdim] - m[i, :zdim]) / eps
        assert np.all(std > 0)
    with pytest.raises(UserError, match="seeds"):
        extract_latents(tiny, images, seeds=[1, 2])
    with pytest.raises(UserError, match="posterior"):
        extract_latents(tiny, images, posterior="mode")


# (e) decoding -----------------------------------------------------------------------------------


def test_decode_shapes_and_per_image_seeds(tiny, images):
    cfg = VDVAEConfig.tiny()
    z = extract_latents(tiny, images, seed=0)
    out = decode_latents(tiny, z, seed=100, batch_size=2)
    assert out.shape == (5, 64, 64, 3) and out.dtype == np.uint8
    assert out.std() > 0
    np.testing.assert_array_equal(out, decode_latents(tiny, z, seed=100, batch_size=2))
    assert (out != decode_latents(tiny, z, seed=101, batch_size=2)).mean() > 0.1
    # same seed, other latents -> other images (the given groups are really used)
    assert (out != decode_latents(tiny, z + 1.0, seed=100, batch_size=2)).mean() > 0.1

    def frac_diff(x, y):
        return (x != y).mean()

    # image i alone with seed 100 + i, and reversed batch order with matching seeds
    for i in (0, 3):
        assert frac_diff(decode_latents(tiny, z[i:i + 1], seeds=[100 + i])[0], out[i]) < 1e-3
    rev = decode_latents(tiny, z[::-1], seeds=[104, 103, 102, 101, 100], batch_size=5)[::-1]
    assert frac_diff(rev, out) < 1e-3

    with pytest.raises(UserError, match="expected"):
        decode_latents(tiny, z[:, :-1])
    with pytest.raises(UserError, match="n_groups"):
        decode_latents(tiny, z, n_groups=len(cfg.decoder_layers()) + 1)


def test_per_image_noise_independent_of_batch():
    a = PerImageNoise([5, 6, 7])
    b = PerImageNoise([6])
    n3, u3 = a.normal((2, 3)), a.uniform((4,))
    n1, u1 = b.normal((2, 3)), b.uniform((4,))
    torch.testing.assert_close(n3[1], n1[0], rtol=0, atol=0)
    torch.testing.assert_close(u3[1], u1[0], rtol=0, atol=0)
    assert float(u3.min()) >= 1e-5 and float(u3.max()) <= 1 - 1e-5


# (f) preprocessing ------------------------------------------------------------------------------


def test_preprocess_matches_independent_computation(images):
    x = preprocess(images)
    assert x.shape == (5, 64, 64, 3) and x.dtype == torch.float32
    for i, im in enumerate(images):
        small = np.asarray(Image.fromarray(im).resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float64)
        want = (small - 115.92961967) / 69.37404
        np.testing.assert_allclose(x[i].numpy(), want, rtol=0, atol=2e-6)
    with pytest.raises(UserError, match="uint8"):
        preprocess(images.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        preprocess(images[..., :2])


# (g) DMoL sampling ------------------------------------------------------------------------------


def _dmol_numpy(params, k, u_mix, u_log):
    """Per-pixel reference written from the description in spec/method.md §2.2."""
    n, h, w, _ = params.shape
    out = np.zeros((n, h, w, 3))
    for a in range(n):
        for y in range(h):
            for x in range(w):
                p = params[a, y, x].astype(np.float64)
                j = int(np.argmax(p[:k] - np.log(-np.log(u_mix[a, y, x]))))
                colour = [p[k + c * 3 * k: k + (c + 1) * 3 * k] for c in range(3)]  # means, log-scales, coeffs
                raw, coef = [], []
                for c, q in enumerate(colour):
                    u = u_log[a, y, x, c]
                    raw.append(q[j] + np.exp(max(q[k + j], -7.0)) * (np.log(u) - np.log(1 - u)))
                    coef.append(np.tanh(q[2 * k + j]))
                r = np.clip(raw[0], -1, 1)
                g = np.clip(raw[1] + coef[0] * r, -1, 1)
                b = np.clip(raw[2] + coef[1] * r + coef[2] * g, -1, 1)
                out[a, y, x] = (r, g, b)
    return out


def test_dmol_sampling_matches_numpy():
    k = 3
    rng = np.random.default_rng(0)
    params = rng.normal(0, 1.5, size=(2, 3, 4, 10 * k)).astype(np.float32)
    params[0, 0, 0, k + k: k + 2 * k] = -20.0  # log-scales below the -7 clamp
    params[1, 2, 3, k: k + k] = 5.0  # means far outside [-1, 1]: clipping
    u_mix = rng.uniform(1e-5, 1 - 1e-5, size=(2, 3, 4, k)).astype(np.float32)
    u_log = rng.uniform(1e-5, 1 - 1e-5, size=(2, 3, 4, 3)).astype(np.float32)
    got = sample_dmol(torch.from_numpy(params), k, torch.from_numpy(u_mix), torch.from_numpy(u_log)).numpy()
    want = _dmol_numpy(params, k, u_mix, u_log)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got).max() <= 1.0 and np.any(np.abs(got) == 1.0)
    # pixel conversion: (x + 1) * 127.5, clipped, truncated
    from models.vdvae import to_uint8

    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(to_uint8(x), np.array([0, 0, 127, 191, 255], dtype=np.uint8))


def test_temperature_zero_is_the_prior_mean(tiny, images):
    """T = 0 gives the reference's exp(pv + log 0) = 0, i.e. z = prior mean (no math domain error)."""
    z = extract_latents(tiny, images[:2], seed=0)
    groups = split_latents(torch.from_numpy(z[:, :latent_dim(tiny.config, 2)]), latent_shapes(tiny.config, 2))
    dec = tiny.decoder
    with torch.no_grad():
        px0 = dec.forward_manual_latents(groups, PerImageNoise([1, 2]), temperature=0.0)
        # the prior noise no longer matters
        torch.testing.assert_close(px0, dec.forward_manual_latents(groups, PerImageNoise([7, 8]), temperature=0.0))
        # continuity: a vanishing temperature tends to the same decoding
        px_small = dec.forward_manual_latents(groups, PerImageNoise([7, 8]), temperature=1e-7)
        torch.testing.assert_close(px0, px_small, rtol=1e-4, atol=1e-4)
        # T = 1 differs (the noise is really used there)
        assert (dec.forward_manual_latents(groups, PerImageNoise([7, 8]), temperature=1.0) - px0).abs().max() > 1e-3
        # by hand: every sampled group takes the prior mean pm = prior(x)[:, :zdim]
        xs = dec.start_states()
        for i, block in enumerate(dec.dec_blocks):
            x = block.block_input(xs, 2, dec.gain)
            f = block.prior(x)
            zz = groups[i] if i < len(groups) else f[:, :block.zdim]
            xs[block.res] = block.resnet(x + f[:, 2 * block.zdim:] + block.z_proj(zz))
        torch.testing.assert_close(px0, xs[tiny.config.image_size] * dec.gain + dec.bias)
    out = decode_latents(tiny, z[:, :latent_dim(tiny.config, 2)], n_groups=2, temperature=0.0, seed=3)
    assert out.shape == (2, 64, 64, 3)
    with pytest.raises(UserError, match="temperature"):
        dec.forward_manual_latents(groups, PerImageNoise([1, 2]), temperature=-1.0)


def test_mean_pixels_average_the_component_centres(tiny, images):
    """pixels="mean": softmax-weighted centres after the colour coupling; by hand in numpy."""
    from models.vdvae import mean_dmol

    k = 3
    rng = np.random.default_rng(1)
    params = rng.normal(0, 1.5, size=(2, 3, 4, 10 * k)).astype(np.float32)
    params[1, 2, 3, k: k + k] = 5.0  # centres far outside [-1, 1]: clipped before averaging
    got = mean_dmol(torch.from_numpy(params), k).numpy()
    want = np.zeros((2, 3, 4, 3))
    for idx in np.ndindex(2, 3, 4):
        p = params[idx].astype(np.float64)
        w = np.exp(p[:k] - p[:k].max())
        w /= w.sum()
        for j in range(k):
            mean = [p[k + c * 3 * k + j] for c in range(3)]
            coef = [np.tanh(p[k + c * 3 * k + 2 * k + j]) for c in range(3)]
            r = np.clip(mean[0], -1, 1)
            g = np.clip(mean[1] + coef[0] * r, -1, 1)
            want[idx] += w[j] * np.array([r, g, np.clip(mean[2] + coef[1] * r + coef[2] * g, -1, 1)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.isclose(got[1, 2, 3, 0], np.exp(params[1, 2, 3, :k]).sum() / np.exp(params[1, 2, 3, :k]).sum())
    # in decode_latents: the prior still uses the seeds, the pixels add no noise of their own
    z = extract_latents(tiny, images[:2], seed=0)[:, :latent_dim(tiny.config, 2)]
    a = decode_latents(tiny, z, n_groups=2, temperature=0.0, seed=3, pixels="mean")
    np.testing.assert_array_equal(a, decode_latents(tiny, z, n_groups=2, temperature=0.0, seed=9, pixels="mean"))
    assert not np.array_equal(a, decode_latents(tiny, z, n_groups=2, temperature=0.0, seed=3))
    with pytest.raises(UserError, match="pixels"):
        decode_latents(tiny, z, n_groups=2, pixels="mode")
