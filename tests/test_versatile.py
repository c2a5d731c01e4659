"""Tests for models/versatile.py (tiny random Versatile Diffusion, the dual-attention network) and reconstruct/sampling.py (Brain-Diffuser img2img arithmetic)."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models import DualTransformer2DModel

from models import versatile as vd
from reconstruct import sampling as sampler
from pipeline.errors import UserError

D = 32  # tiny CLIP projection dim (768 in the real model)
N = 3
STEPS = 10  # DDIM grid 1, 101, …, 901; strength 0.75 → 7 steps


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def comps():
    return vd.tiny_versatile(seed=0, cross_attention_dim=D)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    g = torch.Generator().manual_seed(1)
    return dict(
        init_images=(rng.rand(N, 64, 64, 3) * 255).astype(np.uint8),
        vision_cond=torch.randn(N, 257, D, generator=g),
        text_cond=torch.randn(N, 77, D, generator=g),
        vision_uncond=torch.randn(257, D, generator=g),
        text_uncond=torch.randn(77, D, generator=g),
    )


def gens(seed=0, n=N):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ----------------------------------------------------------------------------- reference (independent)
def bd_alphas_cumprod():
    """Brain-Diffuser's ᾱ: float64 betas = linspace(√0.00085, √0.012, 1000)², cumprod, stored as float32."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas).astype(np.float32).astype(np.float64)


@torch.no_grad()
def reference_img2img(c, inp, steps, strength, guidance, mix_text, generator_for, z0=None):
    """One image at a time, written straight from method.md §5.2 (noise at grid[t_enc], steps grid[t_enc-1..0]).

    ``z0`` (N,4,h,w): start from these latents instead of encoding the init images ("w/o VDVAE")."""
    ac = bd_alphas_cumprod()
    grid = np.arange(0, 1000, 1000 // steps) + 1
    t_enc = int(strength * steps)
    for m in c.image_unet.modules():  # text tokens first → text transformer (index 1), image → index 0
        if isinstance(m, DualTransformer2DModel):
            m.mix_ratio, m.condition_lengths, m.transformer_index_for_condition = mix_text, [77, 257], [1, 0]
    outs = []
    for i in range(inp["init_images"].shape[0]):
        g = generator_for(i)
        if z0 is not None:
            z = torch.as_tensor(z0[i:i + 1]).float()
        else:
            x = torch.from_numpy(inp["init_images"][i]).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1
            dist = c.vae.encode(x).latent_dist
            z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * 0.18215
        a = ac[grid[t_enc]]
        z = math.sqrt(a) * z + math.sqrt(1 - a) * torch.randn(z.shape, generator=g)
        cond = torch.cat([inp["text_cond"][i], inp["vision_cond"][i]])[None]
        uncond = torch.cat([inp["text_uncond"], inp["vision_uncond"]])[None]
        for j in reversed(range(t_enc)):
            t = int(grid[j])
            a_t = ac[t]
            a_prev = ac[grid[j - 1]] if j > 0 else ac[0]
            e_u = c.image_unet(z, t, encoder_hidden_states=uncond).sample
            e_c = c.image_unet(z, t, encoder_hidden_states=cond).sample
            e = e_u + guidance * (e_c - e_u)
            x0 = (z - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
        img = c.vae.decode(z / 0.18215).sample
        outs.append(torch.clamp((img[0] + 1) / 2, 0, 1).permute(1, 2, 0).numpy())
    return np.stack(outs)


# ----------------------------------------------------------------------------- patch
def test_patch_needed_and_applied(comps):
    block = vd.dual_blocks(comps.image_unet)[0]
    h = torch.randn(1, block.transformers[0].config.in_channels, 4, 4)
    ctx = torch.randn(1, 77 + 257, D)
    with pytest.raises(TypeError, match="encoder_attention_mask"):
        vd._ORIGINAL_DUAL_FORWARD(block, h, ctx, encoder_attention_mask=None)
    vd.apply_dual_transformer_patch()
    patched = DualTransformer2DModel.forward
    vd.apply_dual_transformer_patch()
    assert DualTransformer2DModel.forward is patched  # idempotent
    with torch.no_grad():
        out = block(h, ctx, encoder_attention_mask=None, return_dict=False)[0]
        with pytest.raises(NotImplementedError):
            block(h, ctx, encoder_attention_mask=torch.ones(1, 334))
        # the whole dual UNet (whose blocks pass encoder_attention_mask) runs
        eps = comps.image_unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), encoder_hidden_states=ctx.repeat(2, 1, 1)).sample
    assert out.shape == h.shape and eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


def test_tiny_versatile_places_dual_attention_at_the_levels_asked():
    """The miniature's layout (three VAE levels = 16x16 latents at 64 px; dual attention at the UNet's
    second level and mid block only) is built as asked and runs; a layout of the wrong length is refused."""
    comps = vd.tiny_versatile(seed=0, vae_channels=(16, 32, 32), norm_groups=4, unet_channels=(32, 64, 128),
                              unet_cross_attention=(False, True, False))
    unet = comps.image_unet
    assert comps.vae_scale_factor == 4 and unet.config.sample_size == 16
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    # one dual block in the second down level, two in its up level (layers_per_block + 1), one in the mid
    assert len(vd.dual_blocks(unet)) == 1 + 2 + 1
    assert all(vd.dual_blocks(b) == [] for b in (unet.down_blocks[0], unet.up_blocks[2]))
    vd.set_dual_mixing(unet, 0.4, text_len=77, image_len=257)
    with torch.no_grad():
        eps = unet(torch.randn(1, 4, 16, 16), torch.tensor([1]), encoder_hidden_states=torch.randn(1, 334, D)).sample
    assert eps.shape == (1, 4, 16, 16) and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="one entry per level"):
        vd.tiny_versatile(unet_channels=(32, 64, 128), unet_cross_attention=(True, False))


def test_dual_conversion_shares_text_unet_transformers(comps):
    blocks = dict((n, m) for n, m in comps.image_unet.named_modules() if isinstance(m, DualTransformer2DModel))
    assert len(blocks) == 4 and comps.image_unet.config.dual_cross_attention
    for name, block in blocks.items():
        assert block.transformers[1] is comps.text_unet.get_submodule(name)
        assert block.transformers[0] is not block.transformers[1]


def test_mixing_matches_brain_diffuser_residual_formula(comps):
    block = vd.dual_blocks(comps.image_unet)[1]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, block.transformers[0].config.in_channels, 4, 4, generator=g)
    txt, vis = torch.randn(2, 77, D, generator=g), torch.randn(2, 257, D, generator=g)
    vd.set_dual_mixing(comps.image_unet, 0.4, text_len=77, image_len=257)
    with torch.no_grad():
        got = block(h, torch.cat([txt, vis], 1), return_dict=False)[0]
        t_img = block.transformers[0](h, encoder_hidden_states=vis, return_dict=False)[0]
        t_txt = block.transformers[1](h, encoder_hidden_states=txt, return_dict=False)[0]
    want = h + 0.6 * (t_img - h) + 0.4 * (t_txt - h)  # openaimodel.py mixed_run_dc, mixed_ratio 0.6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (t_img - t_txt).abs().max() > 1e-3  # the two transformers really differ


# ----------------------------------------------------------------------------- schedule constants
def test_fifty_step_schedule_constants(comps):
    ac = sampler.vd_alphas_cumprod(comps.scheduler)
    np.testing.assert_allclose(ac.numpy(), bd_alphas_cumprod(), rtol=0, atol=0)
    torch.testing.assert_close(ac.float(), comps.scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)
    s = sampler.img2img_schedule(ac, 50, 0.75)
    assert s.ddim_timesteps == tuple(range(1, 1000, 20))
    ddim = DDIMScheduler.from_config(comps.scheduler.config)
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == list(s.ddim_timesteps[::-1])  # diffusers gives 981, …, 1 too
    assert s.t_enc == 37 and s.noise_timestep == 741
    assert s.timesteps == tuple(range(721, 0, -20)) and len(s.timesteps) == 37
    assert s.noise_alpha == pytest.approx(bd_alphas_cumprod()[741], abs=0)
    assert s.alpha[0] == pytest.approx(bd_alphas_cumprod()[721], abs=0)
    assert s.alpha_prev[:-1] == s.alpha[1:]
    assert s.alpha_prev[-1] == pytest.approx(bd_alphas_cumprod()[0], abs=0)  # after t = 1: ᾱ_0, not 1
    no_offset = sampler.img2img_schedule(ac, 50, 0.75, reference_offset=False)
    assert no_offset.noise_timestep == 721 and no_offset.timesteps == s.timesteps
    assert sampler.img2img_schedule(ac, 50, 1.0, reference_offset=False).noise_timestep == 981
    with pytest.raises(UserError, match="reference_offset"):
        sampler.img2img_schedule(ac, 50, 1.0)


# ----------------------------------------------------------------------------- img2img
def run(c, inp, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("progress", False)
    if "reference_rng" not in kw:
        kw.setdefault("generators", gens())
    return sampler.img2img(c, **inp, **kw)


def test_img2img_matches_hand_written_reference_loop(comps, inputs):
    got = run(comps, inputs, batch_size=2, output_type="float")
    g = gens()
    want = reference_img2img(comps, inputs, STEPS, 0.75, 7.5, 0.4, lambda i: g[i])
    assert got.shape == (N, 64, 64, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got[0] - got[1]).max() > 0.05  # images differ: conditioning is per image


def test_init_latents_start_the_loop_without_the_encoder(comps, inputs):
    """The "w/o VDVAE" path: given latents are noised and denoised exactly like encoded ones."""
    z0 = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    no_images = {k: v for k, v in inputs.items() if k != "init_images"}
    got = sampler.img2img(comps, None, **no_images, num_inference_steps=STEPS, progress=False, generators=gens(),
                     init_latents=z0, output_type="float", batch_size=2)
    g = gens()
    want = reference_img2img(comps, inputs, STEPS, 0.75, 7.5, 0.4, lambda i: g[i], z0=z0)
    np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(UserError, match="not both"):
        sampler.img2img(comps, inputs["init_images"], **no_images, generators=gens(), init_latents=z0)
    with pytest.raises(UserError, match="channels"):
        sampler.img2img(comps, None, **no_images, generators=gens(), init_latents=z0[:, :3])


def test_uint8_is_truncation_of_float(comps, inputs):
    f = run(comps, inputs, batch_size=3, output_type="float")
    u = run(comps, inputs, batch_size=3)
    assert u.dtype == np.uint8 and u.shape == (N, 64, 64, 3)
    np.testing.assert_array_equal(u, (torch.from_numpy(f) * 255).to(torch.uint8).numpy())
    assert u.max() > u.min()


def test_batch_size_independent(comps, inputs):
    outs = [run(comps, inputs, batch_size=b, output_type="float") for b in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=2e-5)
    other_seed = run(comps, inputs, batch_size=3, output_type="float", generators=gens(seed=10))
    assert np.abs(other_seed - outs[0]).max() > 1e-2  # the generators matter


def test_reference_rng_is_one_sequential_stream(comps, inputs):
    per_image = ("init_images", "vision_cond", "text_cond")
    rng = sampler.BrainDiffuserRNG(seed=0, device="cpu")
    first = run(comps, {k: v[:1] if k in per_image else v for k, v in inputs.items()},
                reference_rng=rng, output_type="float")
    rest = run(comps, {k: v[1:] if k in per_image else v for k, v in inputs.items()},
               reference_rng=rng, output_type="float", batch_size=2)
    whole = run(comps, inputs, reference_rng=sampler.BrainDiffuserRNG(seed=0), output_type="float", batch_size=3)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=2e-5)
    g = torch.Generator().manual_seed(0)  # torch.manual_seed(0) once; posterior(k), noise(k), posterior(k+1), …
    want = reference_img2img(comps, inputs, STEPS, 0.75, 7.5, 0.4, lambda i: g)
    np.testing.assert_allclose(whole, want, atol=2e-5)


def test_save_load_round_trip(comps, inputs, tmp_path):
    before = run(comps, inputs, batch_size=3, output_type="float")
    upstream = vd.save_versatile(comps, tmp_path / "vd")
    assert {p.name for p in upstream.iterdir()} == {"vae", "image_unet", "text_unet", "scheduler"}
    assert not json.loads((upstream / "image_unet" / "config.json").read_text()).get("dual_cross_attention")
    assert len(vd.dual_blocks(comps.image_unet)) == 4  # the in-memory model was restored after saving
    loaded = vd.load_versatile(upstream, "cpu", torch.float32)
    assert loaded.text_unet is None and len(vd.dual_blocks(loaded.image_unet)) == 4
    np.testing.assert_array_equal(run(loaded, inputs, batch_size=3, output_type="float"), before)
    # the dual-only layout (no text_unet) reloads too
    dual_only = vd.save_versatile(loaded, tmp_path / "vd_dual")
    assert not (dual_only / "text_unet").exists()
    again = vd.load_versatile(dual_only)
    np.testing.assert_array_equal(run(again, inputs, batch_size=3, output_type="float"), before)
    with pytest.raises(UserError, match="not empty"):
        vd.save_versatile(comps, upstream)


def test_missing_weights_are_user_errors(comps, tmp_path):
    with pytest.raises(UserError, match="make weights"):
        vd.load_versatile(tmp_path / "nowhere")
    root = vd.save_versatile(comps, tmp_path / "vd")
    for p in (root / "text_unet").iterdir():
        p.unlink()
    (root / "text_unet").rmdir()
    with pytest.raises(UserError, match="text_unet"):
        vd.load_versatile(root)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=str(root)):
        vd.load_versatile(root)


def test_bad_arguments_are_user_errors(comps, inputs):
    for kw in ({"strength": 1.5}, {"strength": -0.1}, {"mix_text": 1.2}, {"mix_text": -0.5},
               {"generators": gens(n=2)}, {"output_type": "png"}, {"batch_size": 0}):
        with pytest.raises(UserError):
            run(comps, inputs, **kw)
    with pytest.raises(UserError, match="exactly one"):
        run(comps, inputs, reference_rng=sampler.BrainDiffuserRNG(0), generators=gens())
    bad = dict(inputs, vision_cond=inputs["vision_cond"][:, :, :16])
    with pytest.raises(UserError, match="vision_cond"):
        run(comps, bad)
    bad = dict(inputs, init_images=inputs["init_images"][:, :60, :60])
    with pytest.raises(UserError, match="multiples of 8"):
        run(comps, bad)
    bad = dict(inputs, init_images=inputs["init_images"].astype(np.float32))  # 0..255 floats
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run(comps, bad)


@pytest.mark.gpu
def test_fp16_unet_on_cuda_close_to_fp32(comps, inputs):
    ref = run(comps, inputs, batch_size=3, output_type="float")
    c16 = vd.VersatileComponents(vae=comps.vae.to("cuda"), image_unet=comps.image_unet.to("cuda", torch.float16),
                                 scheduler=comps.scheduler)
    try:
        got = run(c16, inputs, batch_size=3, output_type="float")
    finally:
        comps.vae.to("cpu")
        comps.image_unet.to("cpu", torch.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).mean() < 0.02


@pytest.mark.parametrize("mix_text, swapped", [(1.0, "vision_cond"), (0.0, "text_cond")])
def test_mixing_extremes_are_pure_text_or_pure_vision_guidance(comps, inputs, mix_text, swapped):
    """mix 1 uses only the text transformers (vision conditioning has no effect), mix 0 only the vision ones."""
    base = run(comps, inputs, batch_size=3, output_type="float", mix_text=mix_text)
    other = dict(inputs)
    other[swapped] = torch.flip(inputs[swapped], [0]) * 3.0
    changed = run(comps, other, batch_size=3, output_type="float", mix_text=mix_text)
    np.testing.assert_allclose(changed, base, atol=1e-6)
    kept = "text_cond" if swapped == "vision_cond" else "vision_cond"
    other = dict(inputs)
    other[kept] = torch.flip(inputs[kept], [0]) * 3.0
    assert np.abs(run(comps, other, batch_size=3, output_type="float", mix_text=mix_text) - base).max() > 1e-3
