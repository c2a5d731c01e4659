"""iCNN baseline: architectures, feature scaling, decoding, the optimisation loop and the whole step.

Tiny seeded VGG19/generator instances (same module trees as bdpy's), 64 px crops and a few
iterations keep the file fast on two CPU cores.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models import icnn as m
from pipeline.common_format import subject_dir
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.runner import Context, run_step, step_spec
from reconstruct import icnn as step
from reconstruct.icnn import common, decode, recon

SIZE = 64


@pytest.fixture(scope="module")
def nets():
    enc = m.tiny_vgg19().eval().requires_grad_(False)
    gen = m.tiny_generator().eval().requires_grad_(False)
    return enc, gen


def _targets_from_code(enc, gen, layers, seed=99, n=1):
    """Features of images the generator can produce (a reachable optimum)."""
    code = torch.randn(n, gen.defc7.in_features, generator=torch.Generator().manual_seed(seed)).abs()
    with common.FeatureTaps(enc, layers) as taps, torch.no_grad():
        return taps(common.centre_crop(gen(code), SIZE))


# ------------------------------------------------------------------------------- architectures

def test_full_size_modules_match_bdpy_state_dicts():
    from bdpy.dl.torch.models import VGG19, AlexNetGenerator

    with torch.device("meta"):
        pairs = [(m.VGG19(), VGG19()), (m.DeepSimGenerator(), m.DeepSimGenerator())]
    pairs[1] = (pairs[1][0], AlexNetGenerator())  # bdpy moves it to 'cpu' in __init__: no meta
    for ours, theirs in pairs:
        a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert a == b


def test_tiny_models_are_seeded_and_layer_map_addresses_them(nets):
    enc, gen = nets
    again = m.tiny_generator()
    assert all(torch.equal(p, q) for p, q in zip(gen.state_dict().values(), again.state_dict().values()))
    shapes = common.unit_shapes(enc, ["conv1_1", "conv5_4", "fc6", "fc8"], SIZE, "cpu")
    assert shapes == {"conv1_1": (4, 64, 64), "conv5_4": (8, 4, 4), "fc6": (32,), "fc8": (10,)}
    with torch.no_grad():
        out = gen(torch.rand(2, 64))
    assert out.shape == (2, 3, 256, 256) and 20 < out.std() < 200  # pixels span a Caffe-like range
    assert (out[0] - out[1]).abs().mean() > 1  # the image depends on the code


def test_check_layers_orders_and_rejects():
    assert common.check_layers(["fc7", "conv1_1", "conv3_2", "fc7"]) == ["conv1_1", "conv3_2", "fc7"]
    with pytest.raises(UserError, match="conv9_9"):
        common.check_layers(["conv1_1", "conv9_9"])


def test_preprocess_and_deprocess_round_trip():
    img = np.random.default_rng(0).integers(30, 220, size=(1, SIZE, SIZE, 3), dtype=np.uint8)
    x = common.preprocess_images(img, SIZE)  # same size: no resampling
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
    # BGR order, Caffe mean subtracted
    np.testing.assert_allclose(x[0, 0].numpy(), img[0, :, :, 2] - 104.0)
    np.testing.assert_allclose(x[0, 2].numpy(), img[0, :, :, 0] - 123.0)
    back = common.deprocess_image(x[0].numpy())
    assert back.shape == (SIZE, SIZE, 3) and back.dtype == np.uint8 and back.min() == 0 and back.max() == 255
    # a monotone stretch of each value: correlation with the input stays ~1
    assert np.corrcoef(back.ravel().astype(float), img[0].ravel().astype(float))[0, 1] > 0.97


# ------------------------------------------------------------------------------- scaling, decoding

def test_feature_std_and_scaling_follow_the_lab_rule():
    rng = np.random.default_rng(1)
    conv = rng.normal(2.0, 3.0, size=(5, 4, 6, 6))
    expected = np.array([np.mean([np.std(c, ddof=1) for c in s]) for s in conv])
    np.testing.assert_allclose(common.feature_std(conv), expected)
    fc = rng.normal(size=(5, 20))
    np.testing.assert_allclose(common.feature_std(fc), fc.std(axis=1, ddof=1))

    pred, mean = rng.normal(size=(4, 6, 6)), rng.normal(size=(4, 6, 6))
    out = decode.scale_decoded(pred, mean, reference_std=7.5)
    a = pred - mean  # the lab: centre on the training mean, divide by the mean channel SD, × reference
    lab = a / np.mean([np.std(c, ddof=1) for c in a]) * 7.5 + mean
    np.testing.assert_allclose(out, lab, rtol=1e-5)
    assert common.feature_std((out - mean)[None])[0] == pytest.approx(7.5, rel=1e-5)


def _regression_data(n=30, p=12, m_test=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    Xt = rng.normal(size=(m_test, p))
    Y = {"conv1_1": (X @ rng.normal(size=(p, 2 * 3 * 3))).reshape(n, 2, 3, 3) + 5.0,
         "fc7": X @ rng.normal(size=(p, 7)) + rng.normal(size=(n, 7))}
    mu, sd = X.mean(0), X.std(0, ddof=1)
    return (X - mu) / sd, (Xt - mu) / sd, Y


def test_decode_all_voxels_matches_sklearn_and_returns_training_mean():
    from sklearn.linear_model import Ridge

    X, Xt, Y = _regression_data()
    preds, means = decode.decode_features(X, Xt, Y, alpha=3.0, progress=False)
    for layer, y in Y.items():
        flat = y.reshape(len(y), -1)
        ref = Ridge(alpha=3.0).fit(X, flat).predict(Xt).reshape((len(Xt),) + y.shape[1:])
        assert preds[layer].shape == ref.shape and preds[layer].dtype == np.float32
        np.testing.assert_allclose(preds[layer], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(means[layer], y.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_decode_row_subset_equals_explicit_rows(tmp_path):
    X, Xt, Y = _regression_data()
    idx = np.array([3, 0, 17, 9, 22, 5, 11, 28, 14, 1])
    path = tmp_path / "conv.npy"
    np.save(path, Y["conv1_1"].astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    lazy, lazy_mean = decode.decode_features(X[idx], Xt, {"c": decode.RowSubset(mm, idx)}, alpha=2.0, progress=False)
    full, full_mean = decode.decode_features(X[idx], Xt, {"c": np.asarray(mm[idx])}, alpha=2.0, progress=False)
    np.testing.assert_array_equal(lazy["c"], full["c"])
    np.testing.assert_array_equal(lazy_mean["c"], full_mean["c"])


def test_decode_with_voxel_selection_uses_top_correlated_voxels_per_unit():
    from sklearn.linear_model import Ridge

    X, Xt, Y = _regression_data(n=40, p=15)
    y = Y["fc7"]
    preds, means = decode.decode_features(X, Xt, {"fc7": y}, alpha=10.0, n_voxels=5, progress=False)
    assert preds["fc7"].shape == (len(Xt), 7)
    np.testing.assert_allclose(means["fc7"], y.mean(0), rtol=1e-6)
    for j in (0, 4):  # independent per-unit computation: top-5 |r| voxels, ridge on z-scored data
        mu, sd = y[:, j].mean(), y[:, j].std(ddof=1)
        r = np.array([np.corrcoef(X[:, v], y[:, j])[0, 1] for v in range(X.shape[1])])
        sel = np.argsort(-np.abs(r))[:5]
        w = Ridge(alpha=10.0, fit_intercept=False).fit(X[:, sel], (y[:, j] - mu) / sd)
        np.testing.assert_allclose(preds["fc7"][:, j], w.predict(Xt[:, sel]) * sd + mu, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- optimisation

def test_optimisation_lowers_the_feature_loss(nets):
    enc, gen = nets
    layers = ["conv1_2", "conv3_1", "conv4_1", "fc6"]
    targets = _targets_from_code(enc, gen, layers)
    images, hist = recon.reconstruct(targets, enc, gen, seeds=[0], latent_dim=64, n_iter=15, image_size=SIZE,
                                    lr=(0.5, 1e-10), progress=False)
    assert images.shape == (1, 3, SIZE, SIZE) and hist.shape == (15, 1)
    assert hist[-1, 0] < 0.5 * hist[0, 0]
    # the returned image is the last one evaluated: its loss is the last entry
    with common.FeatureTaps(enc, layers) as taps, torch.no_grad():
        feats = taps(images)
    w = recon.layer_weights(targets)
    loss = sum(float(w[l][0]) * float(((feats[l] - targets[l]) ** 2).sum()) for l in layers)
    assert loss == pytest.approx(hist[-1, 0], rel=1e-4)


def test_batched_loop_equals_bdpy_reconstruct_per_image(nets, tmp_path):
    """Each image of a batch is optimised on its own (bit for bit whatever the others are), and
    the loop equals bdpy's single-image iCNN with the same start and settings.

    Image 0 of a batch of *two* is not compared with bdpy: at lr 2 the iterations amplify rounding,
    and a two-row matrix product rounds differently from a one-row one on some CPUs (AVX-512 AMD
    EPYC: 3e-4 apart after one step, 20 % after four; batches of one and three agree to 1e-6)."""
    import torch.optim as optim
    from bdpy.dl.torch.models import layer_map
    from bdpy.recon.torch.icnn import reconstruct as bdpy_reconstruct

    enc, gen = nets
    layers = ["conv1_2", "conv2_2", "fc7"]
    targets = _targets_from_code(enc, gen, layers, n=2)
    others = _targets_from_code(enc, gen, layers, seed=7, n=2)
    kw = dict(n_iter=4, lr=(2.0, 1e-10), momentum=(0.9, 0.9), decay=(0.01, 0.01), latent_dim=64,
              image_size=SIZE, lower_bound=0.0, progress=False)
    pair, hist = recon.reconstruct(targets, enc, gen, seeds=[5, 6], **kw)
    swapped = {l: torch.stack([targets[l][0], others[l][1]]) for l in layers}  # image 1: other target, start
    pair2, hist2 = recon.reconstruct(swapped, enc, gen, seeds=[5, 9], **kw)
    assert torch.equal(pair[0], pair2[0]) and np.array_equal(hist[:, 0], hist2[:, 0])
    assert not np.allclose(pair[1].numpy(), pair2[1].numpy(), atol=1.0)  # the other image has its own run

    one = {l: t[:1] for l, t in targets.items()}
    ours, ours_hist = recon.reconstruct(one, enc, gen, seeds=[5], **kw)
    w = recon.layer_weights(one)
    z0 = torch.randn(64, generator=torch.Generator().manual_seed(5))
    theirs, their_hist = bdpy_reconstruct(
        {l: t.numpy() for l, t in one.items()}, enc, layer_mapping=layer_map("vgg19"), generator=gen,
        optimizer=optim.SGD, layer_weights={l: float(w[l][0]) for l in layers}, image_size=(SIZE, SIZE, 3),
        initial_feature=z0.numpy(), feature_size=(64,), feature_lower_bound=0.0, output_dir=str(tmp_path),
        save_snapshot=False, disp_interval=10**9, return_loss=True, device="cpu",
        **{k: kw[k] for k in ("n_iter", "lr", "momentum", "decay")})
    np.testing.assert_allclose(ours_hist[:, 0], their_hist, rtol=1e-4)
    np.testing.assert_allclose(ours[0].numpy(), theirs, rtol=1e-3, atol=1e-2)
    assert their_hist[-1] < 0.5 * their_hist[1]  # it optimises: a loop that stood still would also agree


# ------------------------------------------------------------------------------- the step

def _config(tmp_path, *extra):
    return load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                            f"paths.weights_dir={tmp_path / 'weights'}", "run.dataset=synthetic",
                            "models.mode=random-tiny", "icnn.n_iter=3", f"icnn.image_size={SIZE}",
                            "icnn.layers=conv1_2,conv3_1,conv5_1,fc7", "icnn.batch_size=1", *extra])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from prepare_data.synthetic import prepare_subject

    root = tmp_path_factory.mktemp("icnn_step")
    prepare_subject(subject_dir(root / "data", "synthetic", "1"), "1", n_train=24, n_test=3, n_voxels=40,
                    image_size=32)
    return root


def test_step_writes_features_predictions_images_and_resumes(synthetic, caplog):
    from PIL import Image

    cfg = _config(synthetic)
    ctx = Context(cfg, Layout(cfg, "1"), device="cpu", progress=False)
    step.run(ctx)
    assert all(p.is_file() for p in step.outputs(ctx))
    assert np.load(ctx.layout.icnn_features("conv3_1", "train")).shape == (24, 8, 16, 16)
    assert np.load(ctx.layout.icnn_features("fc7", "test")).shape == (3, 32)
    pred = np.load(ctx.layout.icnn_prediction("conv1_2"))
    assert pred.shape == (3, 4, SIZE, SIZE) and pred.dtype == np.float32 and np.isfinite(pred).all()
    paths = common.image_paths(ctx)
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    first = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8 for a in first)
    assert not np.array_equal(first[0], first[1])

    # resumability: only the deleted image is redone, bit-identically (seed + index)
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    feat_stamp = ctx.layout.icnn_features("fc7", "train").stat().st_mtime_ns
    paths[1].unlink()
    ctx2 = Context(cfg, Layout(cfg, "1"), device="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="recon"):
        assert run_step(step_spec("icnn_recon"), ctx2) is True
    assert ctx2.resume and "2 of 3 images exist, reconstructing the other 1" in caplog.text  # == [1]
    assert run_step(step_spec("icnn_features"), ctx2) is False  # the features are not redone
    assert run_step(step_spec("icnn_decode"), ctx2) is False  # decoding is not redone either
    assert paths[0].stat().st_mtime_ns == stamps[paths[0]] and paths[2].stat().st_mtime_ns == stamps[paths[2]]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), first[1])
    assert ctx.layout.icnn_features("fc7", "train").stat().st_mtime_ns == feat_stamp

    # changed reconstruction settings make the old images stale
    cfg3 = _config(synthetic, "icnn.n_iter=1")
    step.run(Context(cfg3, Layout(cfg3, "1"), device="cpu", progress=False))
    assert all(p.stat().st_mtime_ns != stamps[p] for p in (paths[0], paths[2]))


def test_variant_reuses_base_features_and_decodes_its_rows(synthetic):
    from pipeline.variant import write_variant

    cfg = _config(synthetic)
    base = Context(cfg, Layout(cfg, "1"), device="cpu", progress=False)
    step.run(base)  # complete (or completes) the base run
    stamp = base.layout.icnn_features("conv1_2", "train").stat().st_mtime_ns
    layout = Layout(cfg, "1", "half")
    write_variant(layout, "random", indices=np.arange(0, 24, 2))
    ctx = Context(cfg, layout, device="cpu", progress=False)
    step.run(ctx)
    assert layout.icnn_features("conv1_2", "train") == base.layout.icnn_features("conv1_2", "train")
    assert layout.icnn_features("conv1_2", "train").stat().st_mtime_ns == stamp
    assert all(p.is_file() for p in common.image_paths(ctx))
    mean_half = np.load(layout.icnn_train_mean("fc7"))
    feats = np.load(base.layout.icnn_features("fc7", "train"))
    np.testing.assert_allclose(mean_half, feats[::2].mean(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.load(layout.icnn_prediction("fc7")), np.load(base.layout.icnn_prediction("fc7")))


def test_missing_real_weights_is_a_user_error(synthetic):
    cfg = _config(synthetic, "models.mode=real")
    with pytest.raises(UserError, match=r"vgg19\.pt.*make weights"):
        step.run(Context(cfg, Layout(cfg, "1"), device="cpu", progress=False))


def test_weight_files_load_strictly_and_refuse_pickled_modules(tmp_path):
    from safetensors.torch import save_file

    gen = m.tiny_generator()
    good = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in gen.state_dict().items() if k.startswith(("defc.", "deconv."))}, good)
    with pytest.raises(UserError, match="not a relu7 generator state dict"):
        m.load_generator(good)  # a tiny state dict is not the real 4096-d generator
    pickled = tmp_path / "whole.pt"
    torch.save(gen, pickled)
    with pytest.raises(UserError, match="state_dict"):
        m.read_state_dict(pickled, "relu7 generator")
    bound = tmp_path / "bound.txt"
    bound.write_text(" ".join(["1.5"] * 10) + "\n")
    with pytest.raises(UserError, match="expected 4096"):
        m.load_upper_bound(bound)
    np.testing.assert_array_equal(m.load_upper_bound(bound, latent_dim=10), np.full(10, 1.5, np.float32))


def test_fits_the_step_runner(synthetic):
    from pipeline.runner import StepSpec, is_complete, run_step

    spec = StepSpec("icnn", "reconstruct.icnn", ("icnn", "run.tiny_models"), "iCNN baseline")
    cfg = _config(synthetic)
    ctx = Context(cfg, Layout(cfg, "1"), device="cpu", progress=False)
    assert run_step(spec, ctx) is True  # writes the completion record (work already on disk is reused)
    assert is_complete(spec, ctx) == (True, "complete")
    assert run_step(spec, ctx) is False
    cfg2 = _config(synthetic, "icnn.alpha=50")
    assert is_complete(spec, Context(cfg2, Layout(cfg2, "1"), device="cpu")) == (False, "configuration changed")


def test_stages_keep_runner_records_and_redo_only_what_a_change_reaches(synthetic):
    """No private state files: each stage has its <stage>.done.json (features in the base run), and a
    reconstruction setting redoes icnn_recon only, a decoding setting icnn_decode and icnn_recon."""
    from pipeline.runner import is_complete

    cfg = _config(synthetic)
    base = Layout(cfg, "1")
    run_step(step_spec("icnn"), Context(cfg, base, device="cpu", progress=False))
    for name in step.STAGES:
        assert base.record(name).is_file()
    assert base.record("icnn_features").parent == base.run_dir
    half = Context(cfg, Layout(cfg, "1", "half"), device="cpu", progress=False)  # shared by variants:
    assert not step_spec("icnn_features").per_variant and is_complete(step_spec("icnn_features"), half)[0]
    assert not list(base.run_dir.rglob("extract.json")) and not list(base.run_dir.rglob("recon.json"))
    stamps = {n: base.record(n).stat().st_mtime_ns for n in step.STAGES}

    for extra, redone in (("icnn.n_iter=2", {"icnn_recon"}), ("icnn.alpha=30", {"icnn_decode", "icnn_recon"})):
        cfg2 = _config(synthetic, extra)
        ctx = Context(cfg2, Layout(cfg2, "1"), device="cpu", progress=False)
        assert is_complete(step_spec("icnn_features"), ctx) == (True, "complete")
        assert run_step(step_spec("icnn"), ctx) is True
        now = {n: base.record(n).stat().st_mtime_ns for n in step.STAGES}
        assert {n for n in step.STAGES if now[n] != stamps[n]} == redone
        stamps = now
