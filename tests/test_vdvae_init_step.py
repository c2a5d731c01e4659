"""Step ``vdvae_init`` (reconstruct/vdvae_init.py) and the per-image resume rule (pipeline/resume.py).

The predicted latents are written directly (no ridge needed); the tiny seeded VDVAE decodes them.
"""
import numpy as np
import pytest
from PIL import Image

from models import load as load_models
from models.vdvae import decode_latents, latent_dim
from pipeline import io
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.resume import pending
from pipeline.runner import is_complete, run_step, step_spec
from reconstruct import vdvae_init as step
from step_context import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GROUPS = 6
N = 3


def _cfg(tmp, *extra):
    return load_config([], [f"paths.data_dir={tmp / 'data'}", f"paths.results_dir={tmp / 'res'}",
                            "run.dataset=synthetic", "models.mode=random-tiny", f"features.vdvae_groups={GROUPS}",
                            "vdvae_init.output_size=48", "vdvae_init.batch_size=2", "vdvae_init.seed=7", *extra])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vdvae_init")
    cfg = _cfg(tmp)
    model = load_models.vdvae(cfg, "cpu")
    latents = np.random.default_rng(0).standard_normal((N, latent_dim(model.config, GROUPS))).astype(np.float32)
    io.save_npy(Layout(cfg, "1").prediction("vdvae"), latents)
    return tmp


def test_each_image_is_its_latent_decoded_alone_with_seed_plus_index_and_upsampled(tmp):
    cfg = _cfg(tmp)
    ctx = step_context(cfg)
    assert run_step(step_spec("vdvae_init"), ctx) is True
    assert step.outputs(ctx) == [ctx.layout.image("vdvae", i) for i in range(N)]
    assert step.inputs(ctx) == [ctx.layout.prediction("vdvae")]
    model = load_models.vdvae(cfg, "cpu")
    latents = np.load(ctx.layout.prediction("vdvae"))
    for i in range(N):  # batch of 2 in the step, one image at a time here
        alone = decode_latents(model, latents[i:i + 1], n_groups=GROUPS, batch_size=1, seeds=[7 + i], progress=False)
        want = np.asarray(Image.fromarray(alone[0]).resize((48, 48), resample=Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(np.asarray(Image.open(ctx.layout.image("vdvae", i))), want)


def test_resume_makes_only_the_missing_image_and_a_changed_seed_redoes_all(tmp):
    cfg = _cfg(tmp)
    ctx = step_context(cfg)
    run_step(step_spec("vdvae_init"), ctx)
    paths = step.outputs(ctx)
    before = [p.read_bytes() for p in paths]
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].unlink()
    assert is_complete(step_spec("vdvae_init"), ctx)[1].startswith("missing output")
    assert run_step(step_spec("vdvae_init"), ctx) is True and ctx.resume
    assert [paths[0].stat().st_mtime_ns, paths[2].stat().st_mtime_ns] == [stamps[0], stamps[2]]
    assert paths[1].read_bytes() == before[1]

    other = step_context(_cfg(tmp, "vdvae_init.seed=8"))
    assert run_step(step_spec("vdvae_init"), other) is True and not other.resume
    assert all(p.stat().st_mtime_ns != s for p, s in zip(paths, stamps))
    assert paths[0].read_bytes() != before[0]  # seed 8 + 0 draws other prior samples


def test_wrong_latent_width_is_a_user_error(tmp_path):
    cfg = _cfg(tmp_path)
    io.save_npy(Layout(cfg, "1").prediction("vdvae"), np.zeros((2, 5), np.float32))
    with pytest.raises(UserError, match=r"shape \(2, 5\), expected \(n_test, \d+\) for 6 VDVAE groups"):
        step.run(step_context(cfg))


def test_pending_keeps_files_only_when_resuming(tmp_path):
    paths = [tmp_path / f"{i:04d}.png" for i in range(4)]
    for i in (0, 2):
        paths[i].write_bytes(b"old")
    assert pending(paths, resume=True) == [1, 3]
    assert all(paths[i].is_file() for i in (0, 2))  # kept
    assert pending(paths, resume=False) == [0, 1, 2, 3]
    assert not any(p.exists() for p in paths)  # no image of other settings survives a fresh start
    assert pending([], resume=True) == []
