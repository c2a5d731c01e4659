"""MultiTargetRidge and normalise_fmri against scikit-learn, himalaya and hand numpy computations."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV

from pipeline.errors import UserError
from regression.ridge import MultiTargetRidge, normalise_fmri

ALPHAS = {"vdvae": 40.0, "cliptext": 150.0, "clipvision": 90.0}
REGIMES = {"dual": (50, 120), "primal": (140, 30)}  # (n_train, n_voxels)
SOLVERS = ["cholesky", "eigh"]
N_TEST = 17


def _data(n, p, seed=0):
    """Normalised-looking X with some signal in every target group; shapes mimic the real groups."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + N_TEST, p)) * 300 + 50
    X, Xt, _ = normalise_fmri(X[:n], X[n:])
    W = rng.standard_normal((p, 24)) / np.sqrt(p)
    S = X @ W
    St = Xt @ W
    targets, ts = {}, {}
    for name, shape in (("vdvae", (40,)), ("cliptext", (5, 6)), ("clipvision", (7, 3))):
        d = int(np.prod(shape))
        M = rng.standard_normal((24, d))
        off = rng.standard_normal(d) * 3
        targets[name] = (S @ M + off + rng.standard_normal((n, d))).reshape((n,) + shape).astype(np.float32)
        ts[name] = St @ M + off
    return X, Xt, targets


def _sk_predict(X, Y, Xt, alpha):
    """Reference: one sklearn fit on the flattened group."""
    n = Y.shape[0]
    return Ridge(alpha=alpha, fit_intercept=True).fit(X, Y.reshape(n, -1).astype(np.float64)).predict(Xt)


def _hand_rescale(pred, Ytrain):
    """method.md §4.3 written out with numpy, independent of the module."""
    Y = Ytrain.reshape(len(Ytrain), -1).astype(np.float64)
    return (pred - pred.mean(0)) / np.std(pred, axis=0) * np.std(Y, axis=0) + Y.mean(0)


def _rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


# ---------------------------------------------------------------- normalise_fmri

def test_normalise_fmri_matches_hand_computation_ddof1():
    rng = np.random.default_rng(1)
    tr = rng.normal(100, 40, (12, 9))
    te = rng.normal(100, 40, (5, 9))
    tr[:, 4] = 7.0  # constant voxel
    a, b, stats = normalise_fmri(tr, te)
    keep = np.arange(9) != 4
    m = (tr / 300).mean(0)
    s = np.where(keep, (tr / 300).std(0, ddof=1), np.nan)
    np.testing.assert_allclose(a[:, keep], ((tr / 300 - m) / s)[:, keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b[:, keep], ((te / 300 - m) / s)[:, keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a[:, keep].std(0, ddof=1), 1.0, rtol=1e-12)
    # zero-variance guard: std -> 1, column is exactly 0 in training, no NaN anywhere
    assert stats["constant_voxels"].tolist() == [4]
    assert np.all(a[:, 4] == 0) and np.isfinite(b).all()
    np.testing.assert_allclose(b[:, 4], te[:, 4] / 300 - 7.0 / 300)
    np.testing.assert_allclose(stats["mean"], m)
    assert stats["scale"] == 300.0


def test_normalise_fmri_rejects_bad_input():
    x = np.ones((4, 3))
    with pytest.raises(UserError, match="voxels"):
        normalise_fmri(x, np.ones((2, 4)))
    bad = np.random.default_rng(0).standard_normal((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        normalise_fmri(bad, x)
    with pytest.raises(UserError, match="2-D"):
        normalise_fmri(np.ones(5), x)


# ---------------------------------------------------------------- equality with scikit-learn

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("rescale", [False, True])
def test_predictions_equal_sklearn_per_group(regime, rescale, solver):
    n, p = REGIMES[regime]
    X, Xt, targets = _data(n, p)
    model = MultiTargetRidge(ALPHAS, rescale=rescale, progress=False, solver=solver).fit(X, targets)
    assert model.solver_ == regime and model.decomposition_ == solver
    pred = model.predict(Xt)
    for name, Y in targets.items():
        ref = _sk_predict(X, Y, Xt, ALPHAS[name])
        if rescale:
            ref = _hand_rescale(ref, Y)
        assert pred[name].dtype == np.float32
        assert pred[name].shape == (N_TEST,) + Y.shape[1:]
        assert _rel(pred[name].reshape(N_TEST, -1), ref) < 1e-4, name


def test_per_token_sklearn_fits_equal_multi_output_fit():
    """The reference loops over tokens; one multi-output fit of the group gives the same predictions."""
    X, Xt, targets = _data(*REGIMES["dual"])
    Y = targets["clipvision"]  # (n, 7 tokens, 3)
    alpha = {"clipvision": ALPHAS["clipvision"]}
    pred = MultiTargetRidge(alpha, rescale=False, progress=False).fit(X, {"clipvision": Y}).predict(Xt)
    per_token = np.stack([Ridge(alpha=ALPHAS["clipvision"]).fit(X, Y[:, t].astype(np.float64)).predict(Xt)
                          for t in range(Y.shape[1])], axis=1)
    assert _rel(pred["clipvision"], per_token) < 1e-4
    # and with rescaling applied token by token as the reference scripts do
    pred_r = MultiTargetRidge(ALPHAS["clipvision"], progress=False).fit(X, {"clipvision": Y}).predict(Xt)
    ref_r = np.stack([_hand_rescale(per_token[:, t], Y[:, t]) for t in range(Y.shape[1])], axis=1)
    assert _rel(pred_r["clipvision"], ref_r) < 1e-4


def test_matches_himalaya_kernel_ridge():
    himalaya = pytest.importorskip("himalaya.kernel_ridge")
    X, Xt, targets = _data(*REGIMES["dual"])
    Y = targets["vdvae"].astype(np.float64)
    hk = himalaya.KernelRidge(alpha=ALPHAS["vdvae"], kernel="linear", solver="eigenvalues",
                              fit_intercept=True).fit(X, Y)
    ours = MultiTargetRidge(ALPHAS["vdvae"], rescale=False, progress=False).fit(X, {"vdvae": Y}).predict(Xt)
    assert _rel(ours["vdvae"], np.asarray(hk.predict(Xt))) < 1e-4


def test_float32_compute_is_close():
    X, Xt, targets = _data(*REGIMES["dual"])
    pred = MultiTargetRidge(ALPHAS, dtype=torch.float32, rescale=False, progress=False).fit(X, targets).predict(Xt)
    for name, Y in targets.items():
        assert _rel(pred[name].reshape(N_TEST, -1), _sk_predict(X, Y, Xt, ALPHAS[name])) < 1e-3


# ---------------------------------------------------------------- chunking, memmaps, no mutation

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("regime", list(REGIMES))
def test_tiny_memory_budget_gives_same_results(regime, solver):
    X, Xt, targets = _data(*REGIMES[regime])
    one = MultiTargetRidge(ALPHAS, progress=False, solver=solver).fit(X, targets)
    tiny = MultiTargetRidge(ALPHAS, max_memory_gb=2e-6, progress=False, solver=solver).fit(X, targets)
    assert tiny._chunk_size(X.shape[0] * 12, 40) < 10 and one._chunk_size(X.shape[0] * 12, 40) == 40
    a, b = one.predict(Xt), tiny.predict(Xt)
    for name in targets:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
    wa, ba = one.coef("cliptext")
    wb, bb = tiny.coef("cliptext")
    np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ba, bb, rtol=1e-5, atol=1e-6)


def test_memmap_targets_and_inputs_untouched(tmp_path):
    X, Xt, targets = _data(*REGIMES["dual"])
    maps = {}
    for name, Y in targets.items():
        np.save(tmp_path / f"{name}.npy", Y)
        maps[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")  # read-only: a write would raise
    X0, Y0 = X.copy(), targets["vdvae"].copy()
    Y64 = targets["vdvae"].astype(np.float64)  # float64 input must not be centred in place either
    Y64_0 = Y64.copy()
    pred = MultiTargetRidge(ALPHAS, max_memory_gb=1e-5, progress=False).fit(X, maps).predict(Xt)
    MultiTargetRidge(ALPHAS["vdvae"], progress=False).fit(X, {"vdvae": Y64}).predict(Xt)
    ref = MultiTargetRidge(ALPHAS, progress=False).fit(X, targets).predict(Xt)
    for name in targets:
        np.testing.assert_allclose(pred[name], ref[name], rtol=1e-5, atol=1e-5)  # float32 stream: BLAS blocking differs by chunk
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(targets["vdvae"], Y0)
    np.testing.assert_array_equal(Y64, Y64_0)


# ---------------------------------------------------------------- rescaling

def test_rescaling_matches_hand_numpy_and_guards_constant_predictions():
    X, Xt, targets = _data(*REGIMES["primal"])
    Y = targets["vdvae"].copy()
    Y[:, 3] = 2.5  # constant target -> constant prediction: std 0 (the reference gives NaN)
    raw = MultiTargetRidge(ALPHAS["vdvae"], rescale=False, progress=False).fit(X, {"v": Y}).predict(Xt)["v"]
    res = MultiTargetRidge(ALPHAS["vdvae"], rescale=True, progress=False).fit(X, {"v": Y}).predict(Xt)["v"]
    p = raw.astype(np.float64)
    keep = np.arange(Y.shape[1]) != 3
    with np.errstate(invalid="ignore"):
        hand = (p - p.mean(0)) / p.std(0) * Y.astype(np.float64).std(0) + Y.astype(np.float64).mean(0)
    np.testing.assert_allclose(res[:, keep], hand[:, keep], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res[:, 3], 2.5)
    # rescaled predictions carry the training mean and std (ddof=0) exactly
    np.testing.assert_allclose(res.std(0)[keep], Y.std(0)[keep], rtol=1e-4)


# ---------------------------------------------------------------- CV, weights

@pytest.mark.parametrize("regime", list(REGIMES))
def test_loo_cv_alpha_matches_sklearn_ridgecv(regime):
    X, Xt, targets = _data(*REGIMES[regime], seed=3)
    grid = np.logspace(-1, 4, 11)
    model = MultiTargetRidge(None, cv_alphas={"vdvae": grid, "cliptext": grid[:4]}, progress=False)
    model.fit(X, {"vdvae": targets["vdvae"], "cliptext": targets["cliptext"]})
    for name, g in (("vdvae", grid), ("cliptext", grid[:4])):
        Y = targets[name].reshape(len(X), -1).astype(np.float64)
        cv = RidgeCV(alphas=g, fit_intercept=True).fit(X, Y)
        assert model.alphas_[name] == pytest.approx(cv.alpha_)
        assert -model.cv_scores_[name].min() == pytest.approx(cv.best_score_, rel=1e-8)
    assert 0 < np.argmin(model.cv_scores_["vdvae"]) < len(grid) - 1  # an interior optimum: non-trivial


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("regime", list(REGIMES))
def test_coef_and_safetensors_weights_match_sklearn(tmp_path, regime, solver):
    from safetensors.numpy import load_file
    X, Xt, targets = _data(*REGIMES[regime])
    model = MultiTargetRidge(ALPHAS, max_memory_gb=2e-6, progress=False, solver=solver).fit(X, targets)
    Y = targets["clipvision"]
    sk = Ridge(alpha=ALPHAS["clipvision"]).fit(X, Y.reshape(len(X), -1).astype(np.float64))
    w, b = model.coef("clipvision")
    assert w.shape == (7, 3, X.shape[1]) and b.shape == (7, 3)
    np.testing.assert_allclose(w.reshape(21, -1), sk.coef_, atol=1e-6 * np.abs(sk.coef_).max())
    np.testing.assert_allclose(b.ravel(), sk.intercept_, atol=1e-5 * np.abs(sk.intercept_).max())
    path = model.save_weights(tmp_path / "w.safetensors", dtype=np.float32)
    loaded = load_file(path)
    assert set(loaded) == {f"{g}.{k}" for g in targets for k in ("weight", "bias")}
    np.testing.assert_array_equal(loaded["clipvision.weight"], w)
    np.testing.assert_array_equal(loaded["clipvision.bias"], b)
    assert loaded["cliptext.weight"].shape == (5, 6, X.shape[1])


def test_auto_solver_cholesky_for_fixed_alphas_eigh_for_cv_and_many(caplog):
    import logging

    from regression.ridge import CHOLESKY_MAX_ALPHAS
    X, Xt, targets = _data(*REGIMES["dual"])
    with caplog.at_level(logging.INFO, logger="recon"):
        fixed = MultiTargetRidge(ALPHAS, progress=False).fit(X, targets)
    assert fixed.decomposition_ == "cholesky" and not hasattr(fixed, "eigvals_")
    assert "cholesky of the dual Gram matrix (50 x 50" in caplog.text and "3 fixed alphas" in caplog.text
    cv = MultiTargetRidge(None, cv_alphas=[1.0, 10.0], progress=False).fit(X, targets)
    assert cv.decomposition_ == "eigh" and not hasattr(cv, "gram_")
    # more distinct alphas than CHOLESKY_MAX_ALPHAS: one eigh serves them all, same predictions
    k = CHOLESKY_MAX_ALPHAS + 1
    Y = targets["vdvae"]
    many = {f"g{i}": Y[:, 4 * i:4 * i + 4] for i in range(k)}
    alphas = {f"g{i}": 10.0 * (i + 1) for i in range(k)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recon"):
        m = MultiTargetRidge(alphas, rescale=False, progress=False).fit(X, many)
    assert m.decomposition_ == "eigh" and f"{k} distinct alphas" in caplog.text
    pred = m.predict(Xt)
    for name, y in many.items():
        assert _rel(pred[name], _sk_predict(X, y, Xt, alphas[name])) < 1e-4
    # a refit with fixed alphas switches back and leaves no eigh state behind
    m.alphas = {"g0": 10.0}
    m.fit(X, {"g0": many["g0"]})
    assert m.decomposition_ == "cholesky" and not hasattr(m, "eigvals_")


def test_cholesky_leaves_gram_matrix_unchanged():
    X, Xt, targets = _data(*REGIMES["dual"])
    model = MultiTargetRidge(ALPHAS, progress=False).fit(X, targets)
    G0 = model.gram_.clone()
    model.predict(Xt)
    model.coef("vdvae")
    assert torch.equal(model.gram_, G0)  # α is added to the diagonal in place and restored exactly
    np.testing.assert_allclose(G0.numpy(), (X - X.mean(0)) @ (X - X.mean(0)).T, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------- errors

def test_bad_inputs_raise_user_error():
    X, Xt, targets = _data(*REGIMES["dual"])
    with pytest.raises(UserError, match="rows"):
        MultiTargetRidge(1.0, progress=False).fit(X, {"v": targets["vdvae"][:-1]})
    Xn = X.copy()
    Xn[3, 7] = np.nan
    with pytest.raises(UserError, match="NaN"):
        MultiTargetRidge(1.0, progress=False).fit(Xn, targets)
    with pytest.raises(UserError, match="do not match"):
        MultiTargetRidge({"vdvae": 1.0}, progress=False).fit(X, targets)
    with pytest.raises(UserError, match="> 0"):
        MultiTargetRidge(-1.0, progress=False).fit(X, targets)
    model = MultiTargetRidge(1.0, progress=False).fit(X, targets)
    with pytest.raises(UserError, match="voxels"):
        model.predict(Xt[:, :-1])
    Yn = targets["vdvae"].copy()
    Yn[0, 5] = np.inf
    with pytest.raises(UserError, match="'v'"):
        MultiTargetRidge(1.0, progress=False).fit(X, {"v": Yn}).predict(Xt)
    with pytest.raises(RuntimeError, match="not fitted"):
        MultiTargetRidge(1.0).predict(Xt)
    with pytest.raises(UserError, match="solver"):
        MultiTargetRidge(1.0, solver="svd").fit(X, targets)
    with pytest.raises(UserError, match="cv_alphas needs solver"):
        MultiTargetRidge(None, cv_alphas=[1.0], solver="cholesky").fit(X, targets)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_equals_cpu(solver):
    X, Xt, targets = _data(*REGIMES["dual"])
    cpu = MultiTargetRidge(ALPHAS, progress=False, solver=solver).fit(X, targets).predict(Xt)
    gpu = MultiTargetRidge(ALPHAS, device="cuda", progress=False, solver=solver).fit(X, targets).predict(Xt)
    for name in targets:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-5, atol=1e-5)
