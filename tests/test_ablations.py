"""The paper's Table-2 ablations in the versatile step (paper p. 9; method.md §6.6).

"w/o VDVAE" = a random AutoKL latent (default ``versatile.without_vdvae = "random_latent"``; the old
random-pixel image is ``"noise_image"``). "w/o CLIP-Text" / "w/o CLIP-Vision" = the reference
script's mixing switch, vision-only / text-only dual attention (default ``clip_ablation = "mixing"``;
the unconditional embedding is ``"unconditional"``).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from models import load as load_models
from reconstruct.sampling import img2img
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.runner import run_step, step_spec
from reconstruct import versatile as step
from step_context import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 8


def _cfg(tmp, *extra):
    return load_config([], [f"paths.data_dir={tmp / 'data'}", f"paths.results_dir={tmp / 'res'}",
                            "run.dataset=synthetic", "models.mode=random-tiny", "synthetic.n_train=24",
                            "synthetic.n_test=3", "synthetic.n_voxels=40", "synthetic.image_size=32",
                            "features.vdvae_groups=6", "ridge.alpha_vdvae=3", "ridge.alpha_cliptext=5",
                            "ridge.alpha_clipvision=7", "vdvae_init.output_size=64",
                            f"versatile.num_inference_steps={STEPS}", "versatile.batch_size=3", *extra])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablations")
    cfg = _cfg(tmp)
    for name in ("prepare", "features", "ridge", "vdvae_init"):
        run_step(step_spec(name), step_context(cfg))
    return tmp


def _run(tmp, *extra) -> np.ndarray:
    ctx = step_context(_cfg(tmp, *extra))
    ctx.resume = False
    step.run(ctx)
    return np.stack([np.asarray(Image.open(p)) for p in step.outputs(ctx)])


def _inputs(tmp):
    ctx = step_context(_cfg(tmp))
    clip = load_models.clip(ctx.cfg, "cpu")
    vision, text, vu, tu = step.conditioning(ctx, clip)
    return ctx, vision, text, vu, tu


def test_without_vdvae_is_a_random_autokl_latent(tmp):
    got = _run(tmp, "versatile.use_vdvae_init=false")
    ctx, vision, text, vu, tu = _inputs(tmp)
    comps = load_models.versatile(ctx.cfg, "cpu")
    # by hand: z0 ~ N(0, 1) per image from default_rng([seed, i]), noised to ᾱ(grid[t_enc]), DDIM with CFG
    z0 = np.stack([np.random.default_rng([0, i]).standard_normal((4, 8, 8), dtype=np.float32) for i in range(3)])
    want = img2img(comps, None, vision, text, vu, tu, num_inference_steps=STEPS, progress=False,
                   generators=[torch.Generator().manual_seed(i) for i in range(3)], init_latents=z0)
    np.testing.assert_array_equal(got, want)
    noise_image = _run(tmp, "versatile.use_vdvae_init=false", "versatile.without_vdvae=noise_image")
    with_vdvae = _run(tmp)
    assert np.abs(noise_image.astype(int) - got).mean() > 1 and np.abs(with_vdvae.astype(int) - got).mean() > 1


@pytest.mark.parametrize("switch, mix, ignored", [("use_clip_text", 0.0, "text"), ("use_clip_vision", 1.0, "vision")])
def test_clip_ablations_are_the_mixing_switch(tmp, switch, mix, ignored):
    got = _run(tmp, f"versatile.{switch}=false")
    ctx, vision, text, vu, tu = _inputs(tmp)
    comps = load_models.versatile(ctx.cfg, "cpu")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    init = step.load_init_images([ctx.layout.image("vdvae", i) for i in range(3)])
    # the ablated embedding is not used at all: replace it by noise and the images stay the same
    noise = np.random.default_rng(5).standard_normal(text.shape if ignored == "text" else vision.shape).astype(np.float32)
    args = (noise, text) if ignored == "vision" else (vision, noise)
    want = img2img(comps, init, *args, vu, tu, num_inference_steps=STEPS, mix_text=mix, progress=False,
                   generators=gens)
    np.testing.assert_array_equal(got, want)
    # the named alternative: the unconditional embedding, with the usual 0.6 / 0.4 mixing
    alt = _run(tmp, f"versatile.{switch}=false", "versatile.clip_ablation=unconditional")
    cond = (np.broadcast_to(vu.numpy(), vision.shape), text) if ignored == "vision" else (vision, np.broadcast_to(tu.numpy(), text.shape))
    want_alt = img2img(comps, init, *cond, vu, tu, num_inference_steps=STEPS, mix_text=0.4, progress=False,
                       generators=[torch.Generator().manual_seed(i) for i in range(3)])
    np.testing.assert_array_equal(alt, want_alt)
    assert np.abs(alt.astype(int) - got).mean() > 0.5


def test_bad_ablation_settings_are_user_errors(tmp):
    for extra, match in ((("versatile.without_vdvae=noise",), "without_vdvae"),
                         (("versatile.clip_ablation=zero",), "clip_ablation"),
                         (("versatile.use_clip_text=false", "versatile.use_clip_vision=false"), "both false")):
        with pytest.raises(UserError, match=match):
            _run(tmp, *extra)
