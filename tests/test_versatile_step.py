"""Step ``versatile`` (reconstruct/versatile.py): per-image seeds, resume, the conditioning choices and
the init images. Inputs (predicted embeddings, init PNGs) are written directly; the tiny seeded
Versatile Diffusion and CLIP run the step. The paper's ablation switches are in test_ablations.py.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from models import load as load_models
from pipeline import io
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.runner import run_step, step_spec
from reconstruct import versatile as step
from reconstruct.sampling import img2img
from step_context import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, STEPS, SIZE, D = 3, 6, 64, 32


def _cfg(tmp, *extra):
    return load_config([], [f"paths.data_dir={tmp / 'data'}", f"paths.results_dir={tmp / 'res'}",
                            "run.dataset=synthetic", "models.mode=random-tiny", f"vdvae_init.output_size={SIZE}",
                            f"versatile.num_inference_steps={STEPS}", "versatile.batch_size=2", "versatile.seed=3",
                            *extra])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versatile_step")
    layout = Layout(_cfg(tmp), "1")
    rng = np.random.default_rng(0)
    io.save_npy(layout.prediction("clipvision"), (0.5 * rng.standard_normal((N, 257, D))).astype(np.float32))
    io.save_npy(layout.prediction("cliptext"), (0.5 * rng.standard_normal((N, 77, D))).astype(np.float32))
    io.save_npy(layout.base.features("cliptext", "test"), (0.5 * rng.standard_normal((N, 77, D))).astype(np.float32))
    for i in range(N):
        io.save_image(layout.image("vdvae", i), rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return tmp


def _alone(ctx, i, text=None):
    """Image i made alone: img2img of that image with a generator seeded versatile.seed + i."""
    v = ctx.cfg.versatile
    clip = load_models.clip(ctx.cfg, "cpu")
    vision = np.load(ctx.layout.prediction("clipvision"))
    text = np.load(ctx.layout.prediction("cliptext")) if text is None else text
    init = step.load_init_images([ctx.layout.image("vdvae", i)])
    return img2img(load_models.versatile(ctx.cfg, "cpu"), init, vision[i:i + 1], text[i:i + 1],
                   clip.unconditional_image(), clip.unconditional_text(), num_inference_steps=STEPS, batch_size=1,
                   generators=[torch.Generator().manual_seed(v.seed + i)], progress=False)[0]


def _images(ctx):
    return [np.asarray(Image.open(p)) for p in step.outputs(ctx)]


def test_each_image_is_made_alone_from_its_seed_and_a_resume_redoes_only_the_missing(tmp):
    ctx = step_context(_cfg(tmp))
    assert run_step(step_spec("versatile"), ctx) is True
    got = _images(ctx)
    assert [p.name for p in step.outputs(ctx)] == ["0000.png", "0001.png", "0002.png"]
    for i in (0, 2):  # batch [0, 1], [2] in the step; one image per call here
        assert np.abs(got[i].astype(int) - _alone(ctx, i)).max() <= 1
    assert step.inputs(ctx) == [ctx.layout.prediction("clipvision"), ctx.layout.prediction("cliptext"),
                                ctx.layout.images("vdvae")]

    paths = step.outputs(ctx)
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].unlink()
    again = step_context(_cfg(tmp))
    assert run_step(step_spec("versatile"), again) is True and again.resume
    assert [paths[0].stat().st_mtime_ns, paths[2].stat().st_mtime_ns] == [stamps[0], stamps[2]]
    # redone alone, where the first run made it in the batch [0, 1]: as above, rounding may move a level by 1
    assert np.abs(np.asarray(Image.open(paths[1])).astype(int) - got[1]).max() <= 1


def test_reference_rng_redoes_every_image_on_resume(tmp):
    cfg = _cfg(tmp, "versatile.reference_rng=true")
    run_step(step_spec("versatile"), step_context(cfg))
    paths = step.outputs(step_context(cfg))
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[2].unlink()
    ctx = step_context(cfg)
    assert run_step(step_spec("versatile"), ctx) is True and ctx.resume
    assert all(p.stat().st_mtime_ns != s for p, s in zip(paths[:2], stamps))  # one sequential stream


def test_text_features_true_and_shuffled(tmp):
    from ai_captions.shuffle import shuffle_elements

    cfg = _cfg(tmp, "versatile.text_features=true")
    ctx = step_context(cfg)
    clip = load_models.clip(cfg, "cpu")
    _, text, _, _ = step.conditioning(ctx, clip)
    np.testing.assert_array_equal(text, np.load(ctx.layout.base.features("cliptext", "test")))
    assert ctx.layout.base.features("cliptext", "test") in step.inputs(ctx)
    shuffled = step_context(_cfg(tmp, "versatile.text_features=shuffled"))
    _, text, _, _ = step.conditioning(shuffled, clip)
    predicted = np.load(ctx.layout.prediction("cliptext"))
    np.testing.assert_array_equal(text, shuffle_elements(predicted, 3))
    assert sorted(text.ravel().tolist()) == sorted(predicted.ravel().tolist()) and not np.array_equal(text, predicted)
    with pytest.raises(UserError, match="text_features"):
        step.conditioning(step_context(_cfg(tmp, "versatile.text_features=mine")), clip)


def test_init_images_resize_bicubic_and_bad_files_are_user_errors(tmp, tmp_path):
    path = Layout(_cfg(tmp), "1").image("vdvae", 0)
    got = step.load_init_images([path], size=32)
    want = np.asarray(Image.open(path).convert("RGB").resize((32, 32), resample=Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got[0], want)
    assert step.load_init_images([path]).shape == (1, SIZE, SIZE, 3)
    with pytest.raises(UserError, match="init image not found"):
        step.load_init_images([tmp_path / "none.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable image"):
        step.load_init_images([bad])


def test_random_init_latents_are_seeded_per_image():
    a = step.random_init_latents(4, [2, 0], (4, 2, 2))
    np.testing.assert_array_equal(a[0], np.random.default_rng([4, 2]).standard_normal((4, 2, 2), dtype=np.float32))
    np.testing.assert_array_equal(a[1], step.random_init_latents(4, [0], (4, 2, 2))[0])


def test_out_of_range_strength_is_a_user_error(tmp):
    with pytest.raises(UserError, match="strength"):
        step.run(step_context(_cfg(tmp, "versatile.strength=1.5")))
