"""The ridge step's saved weights (``ridge.save_weights = true``): streamed safetensors that
reproduce the step's own test predictions before the post-hoc rescaling."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.common_format import read_split, subject_dir
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.layout import TARGETS, Layout
from pipeline.runner import Context, run_step, step_spec
from regression.ridge_step import normalisation_path
from step_context import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, *extra):
    return load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                            "run.dataset=synthetic", "models.mode=random-tiny", "synthetic.n_train=24",
                            "synthetic.n_test=5", "synthetic.n_voxels=40", "synthetic.image_size=32", "features.vdvae_groups=6",
                            "ridge.alpha_vdvae=3", "ridge.alpha_cliptext=5", "ridge.alpha_clipvision=7",
                            *extra])


@pytest.fixture(scope="module")
def features_done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ridge_step")
    cfg = _cfg(tmp)
    for step in ("prepare", "features"):
        run_step(step_spec(step), step_context(cfg))
    return tmp


@pytest.mark.parametrize("rescale", [False, True])
def test_saved_weights_reproduce_the_step_predictions(features_done, rescale):
    tmp = features_done
    cfg = _cfg(tmp, "ridge.save_weights=true", f"ridge.rescale={str(rescale).lower()}")
    ctx = step_context(cfg)
    assert run_step(step_spec("ridge"), ctx, ) is True
    layout = ctx.layout
    # the normalisation, by hand from the common-format fMRI: /scale, training mean and std (ddof=1)
    d = subject_dir(cfg.resolve_path(cfg.paths.data_dir), "synthetic", 1)
    raw_train = read_split(d, "train", 1, parts=("fmri",)).fmri.astype(np.float64) / cfg.ridge.fmri_scale
    raw_test = read_split(d, "test", 1, parts=("fmri",)).fmri.astype(np.float64) / cfg.ridge.fmri_scale
    mean, std = raw_train.mean(0), raw_train.std(0, ddof=1)
    norm = load_file(normalisation_path(layout))
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(norm["std"], std, rtol=1e-12)
    Xt = (raw_test - mean) / std
    for target in TARGETS:
        w = load_file(layout.ridge_weights(target))
        assert set(w) == {f"{target}.weight", f"{target}.bias"}
        W, b = w[f"{target}.weight"].astype(np.float64), w[f"{target}.bias"].astype(np.float64)
        pred = np.load(layout.prediction(target))
        assert W.shape == pred.shape[1:] + (Xt.shape[1],) and b.shape == pred.shape[1:]
        raw = np.einsum("nv,...v->n...", Xt, W) + b  # before rescaling
        if rescale:  # the reference's re-standardisation, by hand (ddof 0, training-feature stats)
            Y = np.load(layout.features(target, "train")).astype(np.float64)
            raw = (raw - raw.mean(0)) / raw.std(0) * Y.std(0) + Y.mean(0)
        scale = np.abs(pred).max()
        np.testing.assert_allclose(pred, raw, atol=2e-5 * scale, rtol=0)
        assert np.abs(pred - pred.mean(0)).max() > 1e-3 * scale  # not a constant prediction


def test_bad_weights_dtype_is_a_user_error_before_the_fit(features_done):
    from regression import ridge_step

    # config validation catches it when the config loads, before any step (the step checks too)
    with pytest.raises(UserError, match="ridge.weights_dtype"):
        ridge_step.run(step_context(_cfg(features_done, "ridge.save_weights=true", "ridge.weights_dtype=int8")))


# ---------------------------------------------------------------------------------------------
# variants: the runner brings the base ridge up to date first only when the variant reuses it


@pytest.fixture
def variant_setup(tmp_path):
    cfg = _cfg(tmp_path)
    for step in ("prepare", "features"):
        run_step(step_spec(step), step_context(cfg))
    return cfg


def test_a_settings_variant_reuses_the_base_predictions_the_runner_made_first(variant_setup):
    from pipeline import io
    from pipeline.variant import write_variant

    cfg = variant_setup
    layout = Layout(cfg, "1", "same_rows")
    write_variant(layout, "settings")
    assert not layout.base.record("ridge").exists()
    assert run_step(step_spec("ridge"), Context(cfg=cfg, layout=layout, device="cpu", progress=False)) is True
    assert layout.base.record("ridge").is_file()
    for t in TARGETS:  # copied, not re-fitted
        assert np.array_equal(io.load_npy(layout.prediction(t)), io.load_npy(layout.base.prediction(t)))


def test_a_row_subset_is_fitted_afresh_without_the_base_ridge(variant_setup):
    from pipeline import io
    from pipeline.variant import write_variant

    cfg = variant_setup
    layout = Layout(cfg, "1", "half")
    write_variant(layout, "random", indices=np.arange(0, 24, 2))
    assert run_step(step_spec("ridge"), Context(cfg=cfg, layout=layout, device="cpu", progress=False)) is True
    assert not layout.base.record("ridge").exists()
    run_step(step_spec("ridge"), step_context(cfg))
    assert not np.allclose(io.load_npy(layout.prediction("vdvae")), io.load_npy(layout.base.prediction("vdvae")))
