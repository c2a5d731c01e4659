"""The features step (regression/extract_features.py) for a training-set variant: the runner runs
the base features first (StepSpec.needs_base), the step extracts only what the variant changes."""
import numpy as np
import pytest

from pipeline import io
from pipeline.common_format import read_split
from pipeline.config import BASE_VARIANT, load_config
from pipeline.layout import TARGETS, Layout
from pipeline.runner import Context, is_complete, run_step, step_spec
from pipeline.variant import write_variant
from regression.extract_features import train_target_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path):
    return load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                            "run.dataset=synthetic", "models.mode=random-tiny", "synthetic.n_train=12",
                            "synthetic.n_test=3", "synthetic.n_voxels=20", "synthetic.image_size=32",
                            "features.vdvae_groups=4"])


def test_a_caption_variant_gets_the_base_features_first_and_reextracts_only_cliptext(tmp_path):
    cfg = _cfg(tmp_path)
    variant = Layout(cfg, "1", "caps")
    ctx = Context(cfg=cfg, layout=variant, device="cpu", progress=False)
    run_step(step_spec("prepare"), ctx)  # not per-variant: lands in the base layout's common format
    assert (variant.base.data_dir / "prepare.done.json").is_file()
    train = read_split(variant.base.data_dir, "train", "1", parts=("cap",))
    captions = np.asarray(train.cap).copy()
    captions[:4] = "a completely different caption"
    write_variant(variant, "captions", captions=captions)
    assert not variant.base.record("features").exists()

    assert run_step(step_spec("features"), ctx) is True
    base_ctx = Context(cfg=cfg, layout=variant.base, device="cpu", progress=False)
    assert is_complete(step_spec("features"), base_ctx) == (True, "complete")  # run by the runner, not the step
    written = sorted(p.name for p in (variant.run_dir / "features").glob("*.npy"))
    assert written == ["cliptext_train.npy"]  # vdvae/clipvision and the test split stay the base run's
    assert train_target_path(variant, "vdvae") == variant.base.features("vdvae", "train")
    own, base = io.load_npy(variant.features("cliptext", "train")), io.load_npy(variant.base.features("cliptext", "train"))
    assert own.shape == base.shape
    assert np.allclose(own[4:], base[4:], atol=1e-5)  # unchanged captions encode the same
    assert not np.allclose(own[:4], base[:4], atol=1e-3)
    for t in TARGETS:
        assert variant.base.features(t, "test").is_file()


def test_force_on_a_variant_does_not_redo_the_base(tmp_path):
    cfg = _cfg(tmp_path)
    variant = Layout(cfg, "1", "caps")
    ctx = Context(cfg=cfg, layout=variant, device="cpu", progress=False)
    run_step(step_spec("prepare"), ctx)
    captions = np.asarray(read_split(variant.base.data_dir, "train", "1", parts=("cap",)).cap).copy()
    captions[0] = "another caption"
    write_variant(variant, "captions", captions=captions)
    run_step(step_spec("features"), ctx)
    base_record = variant.base.record("features").stat().st_mtime_ns
    forced = Context(cfg=cfg, layout=variant, device="cpu", force=True, progress=False)
    assert run_step(step_spec("features"), forced) is True
    assert variant.base.record("features").stat().st_mtime_ns == base_record
    assert BASE_VARIANT == variant.base.variant == "base"


def test_vdvae_targets_use_the_seeds_of_pipeline_seeds(tmp_path):
    """Train and test VDVAE posterior samples are drawn with pipeline.seeds.vdvae_posterior's seeds
    (features.seed, and features.seed + 1,000,000 for the test images)."""
    from models import load as load_models
    from models.vdvae import extract_latents
    from pipeline import seeds

    cfg = _cfg(tmp_path)
    layout = Layout(cfg, "1")
    ctx = Context(cfg=cfg, layout=layout, device="cpu", progress=False)
    for step in ("prepare", "features"):
        run_step(step_spec(step), ctx)
    assert seeds.vdvae_posterior(cfg, "test") == cfg.features.seed + 1_000_000 != seeds.vdvae_posterior(cfg, "train")
    model = load_models.vdvae(cfg, "cpu")
    for split in ("train", "test"):
        stim = read_split(layout.data_dir, split, "1", parts=("stim",)).stim
        expected = extract_latents(model, stim, n_groups=cfg.features.vdvae_groups, batch_size=cfg.features.vdvae_batch_size,
                                   seed=seeds.vdvae_posterior(cfg, split), progress=False)
        np.testing.assert_allclose(io.load_npy(layout.features("vdvae", split)), expected, rtol=1e-5, atol=1e-6)
    other = extract_latents(model, read_split(layout.data_dir, "test", "1", parts=("stim",)).stim,
                            n_groups=cfg.features.vdvae_groups, seed=seeds.vdvae_posterior(cfg, "train"), progress=False)
    assert not np.allclose(io.load_npy(layout.features("vdvae", "test")), other)
