"""fMRI -> feature ridge regression, every target group solved from ONE factorisation of X.

Brain-Diffuser (method.md §4) fits scikit-learn ``Ridge(alpha, fit_intercept=True)`` once for the
VDVAE latents (alpha 5e4) and once *per token* for CLIP-text (77 fits, alpha 1e5) and CLIP-vision
(257 fits, alpha 6e4), all on the same X.  Since alpha and X are shared inside a group, a per-token
loop equals one multi-output fit, and every group needs only the centred Gram matrix of X.  This
module factors it once per distinct alpha (or eigendecomposes it once) and streams the targets
through the result.

Notation (C = centred by the training mean; G the Gram matrix of the regime)::

    dual   (n <= p):  G = Xc Xcᵀ (n, n)     M_α = (Xt − x̄) Xcᵀ (G + αI)⁻¹
    primal (n >  p):  G = Xcᵀ Xc (p, p)     M_α = (Xt − x̄) (G + αI)⁻¹ Xcᵀ
    prediction:       Ŷt = M_α (Y − ȳ) + ȳ

so a test prediction is ``M_α @ Yc`` with ``M_α`` of shape (n_test, n_train): the primal weights
(p × n_targets, 5.7 GB for NSD VDVAE) are never formed and each target column is read once.  This
is why ``fit`` only factors X and keeps *references* to the target arrays; ``predict`` does the
single chunked pass over them.  Two ways to get ``M_α`` (``decomposition_``):

* ``"cholesky"`` (fixed alphas, the paper's; chosen automatically): one Cholesky factorisation of
  G + αI per distinct alpha, and M_α from one triangular solve with n_test right-hand sides.
  An n³/3 factorisation per alpha instead of a ~9n³ eigendecomposition: at the NSD shape
  (n 8,859) ``eigh`` alone took 605 s on 2 cores, three Cholesky factorisations take seconds.
* ``"eigh"`` (cross-validated or many alphas): G = Q diag(λ) Qᵀ once, then every alpha is a
  diagonal rescaling, ``M_α = (Xt − x̄) F diag(1/(λ+α)) Bᵀ`` with F = Xcᵀ Q, B = Q (dual) or
  F = Q, B = Xc Q (primal); the exact leave-one-out error of every candidate alpha comes from
  the same decomposition.

Both keep the decomposition in float64 (the ``dtype`` argument) and stream float32 targets in
float32 against the operator.

himalaya (the field's ridge library) was the first choice, but its ``solve_kernel_ridge_eigenvalues``
re-runs ``eigh`` on every call and allocates the full (n, n_targets) dual weights, which defeats
both the reuse across groups/alphas and the memory budget; the same closed form is written here
in plain torch and checked against himalaya and scikit-learn in ``tests/test_ridge.py``.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import RidgeConfig
from pipeline.errors import UserError
from pipeline.io import atomic_path

# Defaults declared once, in the config ([ridge]): fMRI units (NSD betas are stored as percent
# signal change × 300, method.md §1.1) and the per-chunk working-memory budget.
FMRI_SCALE = RidgeConfig.fmri_scale
MAX_MEMORY_GB = RidgeConfig.max_memory_gb

# solver="auto": Cholesky per distinct alpha up to this many alphas, else one eigendecomposition.
# Measured on the 2-core machine (float64, a loaded CPU): eigh of an n × n Gram matrix 7.1 s / 113 s
# at n 2,000 / 4,000 against 0.44 s / 3.1 s for a Cholesky factorisation plus the solve with 982
# right-hand sides (16× / 37×, growing with n); 8 keeps a margin below the break-even.
CHOLESKY_MAX_ALPHAS = 8
# Target columns per chunk of the pass over the targets, at most: wider chunks do not make the
# (n_test × n) @ (n × c) product faster, they only hold more memory (the budget is an upper bound).
MAX_CHUNK_COLUMNS = 8192
_READ_THREADS = 4  # threads reading the next target chunk (row blocks) while this one is used

log = logging.getLogger("recon")

_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
                       np.dtype(np.float64): "F64"}


# --------------------------------------------------------------------------- fMRI normalisation

def normalise_fmri(train: np.ndarray, test: np.ndarray, scale: float = FMRI_SCALE,
                   dtype=np.float64) -> tuple[np.ndarray, np.ndarray, dict]:
    """Divide by ``scale`` and z-score each voxel with the TRAINING mean and std (ddof=1).

    train: (n_train, n_voxel), test: (n_test, n_voxel) -> same shapes in ``dtype``, plus
    ``stats = {"scale", "mean" (n_voxel,), "std" (n_voxel,), "constant_voxels" (k,) int}``.
    ``mean``/``std`` are of the scaled training data; the test set reuses them (method.md §4.1).

    Zero-variance guard: a voxel that is constant over the training set (the reference would divide
    by 0 and produce NaN) gets std 1, so its training column is exactly 0 after centring and the
    ridge ignores it (its weight is 0 in both the dual and primal solution).  Its indices are
    reported in ``stats["constant_voxels"]`` for the caller to log.
    """
    train = _check_matrix(train, "training fMRI")
    test = _check_matrix(test, "test fMRI")
    if test.shape[1] != train.shape[1]:
        raise UserError(f"test fMRI has {test.shape[1]} voxels but training fMRI has "
                        f"{train.shape[1]}: both must use the same voxel mask")
    if train.shape[0] < 2:
        raise UserError(f"training fMRI has {train.shape[0]} row(s): need >= 2 for a ddof=1 std")
    if not scale > 0:
        raise UserError(f"fMRI scale must be > 0, got {scale}")
    tr = np.asarray(train, dtype=np.float64) / scale
    mean = tr.mean(axis=0)
    std = tr.std(axis=0, ddof=1)
    constant = np.ptp(tr, axis=0) == 0
    std[constant] = 1.0
    tr -= mean
    tr /= std
    te = (np.asarray(test, dtype=np.float64) / scale - mean) / std
    stats = {"scale": float(scale), "mean": mean, "std": std,
             "constant_voxels": np.flatnonzero(constant)}
    return tr.astype(dtype, copy=False), te.astype(dtype, copy=False), stats


# --------------------------------------------------------------------------- rescaling

def rescale_predictions(pred: np.ndarray, train_mean: np.ndarray, train_std: np.ndarray) -> np.ndarray:
    """Brain-Diffuser's post-hoc rescaling (method.md §4.3); TRANSDUCTIVE (uses all test rows).

    pred: (n_test, d); train_mean/train_std: (d,) of the training targets (std with ddof=0).
    Per column: z-score over the test rows (mean, ``np.std`` ddof=0), then ``* train_std + train_mean``.
    A column whose predictions are constant (std 0; the reference gives NaN) becomes ``train_mean``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    mu = pred.mean(axis=0)
    sd = pred.std(axis=0)
    ok = sd > 0
    z = np.zeros_like(pred)
    np.divide(pred - mu, sd, out=z, where=ok[None, :])
    return z * np.asarray(train_std, np.float64) + np.asarray(train_mean, np.float64)


def _rescale_torch(pred: torch.Tensor, train_mean: torch.Tensor, train_std: torch.Tensor) -> torch.Tensor:
    """Same as :func:`rescale_predictions` on a (n_test, c) device tensor."""
    mu = pred.mean(dim=0)
    sd = pred.std(dim=0, correction=0)
    z = torch.where(sd > 0, (pred - mu) / torch.where(sd > 0, sd, torch.ones_like(sd)),
                    torch.zeros_like(pred))
    return z * train_std + train_mean


# --------------------------------------------------------------------------- estimator

class MultiTargetRidge:
    """Ridge with an unpenalised intercept for several target groups sharing one X.

    Equals ``sklearn.linear_model.Ridge(alpha=alphas[g], fit_intercept=True)`` fitted on each group
    (or on each token of it: same alpha and X make that the same fit), in both the n <= p (dual) and
    n > p (primal) regimes.

    Parameters
    ----------
    alphas : {group: alpha} or one float for all groups (may be None when ``cv_alphas`` is given).
    device, dtype : where and in which precision the decomposition runs (float64 matches sklearn
        to ~1e-12; float32 on a GPU is faster but loses digits).  float32 targets are streamed in
        float32 against the operator either way.
    max_memory_gb : budget for the per-chunk working memory of the pass over target columns
        (target chunk copies, device buffers, outputs of one chunk; at most ``MAX_CHUNK_COLUMNS``
        columns).  The decomposition itself (x̄ and Xc with G and one Cholesky factor at a time, or
        λ, B and Xc or V: about (n + p)·min(n, p) numbers) and the returned predictions are extra.
    rescale : apply Brain-Diffuser's transductive post-hoc rescaling (:func:`rescale_predictions`)
        in :meth:`predict`.  The statistics of the training targets are computed in the same
        chunked pass that predicts, so each target column is read once.
    cv_alphas : None (default, use ``alphas``), a list of candidate alphas for every group, or
        {group: list}.  The alpha minimising the exact leave-one-out squared error (summed over all
        targets of the group, intercept refitted per fold — the same criterion as
        ``sklearn.linear_model.RidgeCV(alpha_per_target=False)``) is chosen per group in ``fit``,
        from the same eigendecomposition.  Costs one extra pass over the targets with
        O(n · min(n, p)) work per target column and candidate alpha.
    progress : show tqdm bars over chunks.
    solver : "auto" (default), "cholesky" or "eigh" — how the Gram matrix is decomposed (see the
        module docstring).  "auto" takes "eigh" with ``cv_alphas`` or more than
        ``CHOLESKY_MAX_ALPHAS`` distinct alphas, otherwise "cholesky", and logs the choice.

    Attributes after ``fit``
    ------------------------
    alphas_ : {group: float} alphas in use; cv_scores_ : {group: (n_cv,) mean LOO MSE} (CV only);
    solver_ : "dual" | "primal" (the regime); decomposition_ : "cholesky" | "eigh"; x_mean_ : (p,);
    Cholesky: gram_ : (r, r) G, train_centred_ : (n, p) Xc;
    eigh: eigvals_ : (r,); sample_basis_ : (n, r) B; train_centred_ : (n, p) Xc (dual form) or
    feature_basis_ : (p, p) V (primal form);
    targets_ : {group: (n, T) view of the caller's array, NOT a copy —
    do not modify the target arrays between ``fit`` and ``predict``}; target_shapes_ :
    {group: trailing shape}; n_samples_, n_features_in_.
    """

    def __init__(self, alphas: Mapping[str, float] | float | None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64, max_memory_gb: float = MAX_MEMORY_GB, rescale: bool = True,
                 cv_alphas: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                 progress: bool = True, solver: str = "auto"):
        self.alphas = alphas
        self.device = device
        self.dtype = dtype
        self.max_memory_gb = max_memory_gb
        self.rescale = rescale
        self.cv_alphas = cv_alphas
        self.progress = progress
        self.solver = solver

    # ------------------------------------------------------------------ fit
    def fit(self, X: np.ndarray, targets: Mapping[str, np.ndarray]) -> "MultiTargetRidge":
        """Form and decompose the Gram matrix of X once; keep references to the targets (no pass
        over them unless CV is on).

        X: (n, p) normalised fMRI.  targets: {group: array (n, ...)}, np.memmap welcome.
        """
        device, dtype = self._check_params()
        X = _check_matrix(X, "X")
        n, p = X.shape
        self.targets_, self.target_shapes_ = _check_targets(targets, n)
        alphas = self._resolve_alphas(list(self.targets_))

        decomposition, why = self._choose_decomposition(alphas)
        for attr in ("eigvals_", "sample_basis_", "feature_basis_", "train_centred_", "gram_",
                     "decomposition_", "_factor"):
            self.__dict__.pop(attr, None)  # a refit never mixes state of two decompositions

        Xc = torch.tensor(np.asarray(X), device=device, dtype=dtype)  # a copy: centred in place
        x_mean = Xc.mean(dim=0)
        Xc -= x_mean
        self.solver_ = "dual" if n <= p else "primal"
        gram = Xc @ Xc.T if n <= p else Xc.T @ Xc  # (n, n) kernel or (p, p) covariance
        if decomposition == "cholesky":
            # factored per alpha when the operator is needed (predict, coef): Xc and G are kept
            self.gram_, self.train_centred_ = gram, Xc
        else:
            lam, Q = torch.linalg.eigh(gram)
            del gram
            if n <= p:
                self.sample_basis_, self.train_centred_ = Q, Xc
            else:
                self.sample_basis_, self.feature_basis_ = Xc @ Q, Q
                del Xc
            # G is PSD; round-off can make the smallest eigenvalues slightly negative.
            self.eigvals_ = lam.clamp_(min=0)
        self.decomposition_ = decomposition
        self.x_mean_ = x_mean
        self.n_samples_, self.n_features_in_ = n, p
        self.device_, self.dtype_ = device, dtype
        r = min(n, p)
        log.info("[ridge] %s of the %s Gram matrix (%d x %d, %s, %s): %s", decomposition, self.solver_,
                 r, r, str(dtype).replace("torch.", ""), device, why)

        if self.cv_alphas is None:
            self.alphas_ = alphas
        else:
            self.alphas_, self.cv_scores_ = {}, {}
            for name in self.targets_:
                grid = self._cv_grid(name)
                scores = self._loo_scores(name, grid)
                self.cv_scores_[name] = scores
                self.alphas_[name] = float(grid[int(np.argmin(scores))])
        return self

    # ------------------------------------------------------------------ predict
    def predict(self, X_test: np.ndarray) -> dict[str, np.ndarray]:
        """Predict every group: {group: float32 (n_test, *trailing shape)}.

        One chunked pass over each group's target columns: centre, ``M_α @ Yc + ȳ``, optional
        rescaling with the training mean/std of the same chunk.
        """
        self._check_fitted()
        Xt = _check_matrix(X_test, "X_test")
        if Xt.shape[1] != self.n_features_in_:
            raise UserError(f"X_test has {Xt.shape[1]} voxels but the model was fitted on "
                            f"{self.n_features_in_}")
        dev, dt = self.device_, self.dtype_
        # one (n_test, n) operator per distinct alpha, all formed before the pass over the targets
        operators = self._operators(torch.tensor(np.asarray(Xt), device=dev, dtype=dt) - self.x_mean_,
                                    sorted({self.alphas_[name] for name in self.targets_}))
        out = {}
        n_test = Xt.shape[0]
        for name, Y in self.targets_.items():
            alpha = self.alphas_[name]
            # The decomposition and M_α stay in the solver's precision; the pass over the targets
            # (the bulk of the work: n_test × n × T) runs in the targets' own precision, so float32
            # features are neither copied to float64 nor multiplied at half speed.
            stream = torch.float32 if (Y.dtype == np.float32 and dt == torch.float64) else dt
            op = operators[alpha].to(stream)
            pred = np.empty((n_test, Y.shape[1]), dtype=np.float32)
            el = _itemsize(stream)
            per_col = self.n_samples_ * (Y.dtype.itemsize + el) + n_test * (6 * el + 4)
            for sl, Yc, y_mean, y_std in self._iter_centred(name, per_col, "predict", stream):
                chunk = op @ Yc + y_mean
                if self.rescale:
                    chunk = _rescale_torch(chunk, y_mean, y_std)
                pred[:, sl] = chunk.to(torch.float32).cpu().numpy()
                del Yc, chunk  # free this chunk before the next one is read
            out[name] = pred.reshape((n_test,) + self.target_shapes_[name])
        return out

    def fit_predict(self, X: np.ndarray, targets: Mapping[str, np.ndarray],
                    X_test: np.ndarray) -> dict[str, np.ndarray]:
        """``fit(X, targets).predict(X_test)``: one decomposition, one pass over the targets."""
        return self.fit(X, targets).predict(X_test)

    # ------------------------------------------------------------------ primal weights (on request)
    def coef(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Primal weights of one group, sklearn layout: weight (*trailing, p), intercept (*trailing,).

        Applies to normalised X; predictions ``X @ weight.T + intercept`` are *before* rescaling.
        Held in memory as float32 — for huge groups use :meth:`save_weights`.
        """
        self._check_fitted()
        self._check_name(name)
        T = self.targets_[name].shape[1]
        weight = np.empty((T, self.n_features_in_), np.float32)
        intercept = np.empty(T, np.float32)
        for sl, w, b in self._iter_coef(name):
            weight[sl] = w.to(torch.float32).cpu().numpy()
            intercept[sl] = b.to(torch.float32).cpu().numpy()
            del w
        shape = self.target_shapes_[name]
        return weight.reshape(shape + (self.n_features_in_,)), intercept.reshape(shape)

    def save_weights(self, path: str | Path, dtype=np.float32, names: Sequence[str] | None = None) -> Path:
        """Stream the primal weights of ``names`` (default all) into one safetensors file.

        Tensors ``<group>.weight`` (*trailing, p) and ``<group>.bias`` (*trailing,), written chunk by
        chunk (the file format is written directly so a 12 GB weight never sits in memory).
        Metadata holds the alphas and the note that rescaling is not part of the weights.
        """
        self._check_fitted()
        dtype = np.dtype(dtype)
        if dtype not in _SAFETENSORS_DTYPES:
            raise UserError(f"save_weights: dtype must be float16/32/64, got {dtype}")
        names = list(self.targets_) if names is None else list(names)
        for name in names:
            self._check_name(name)
        header, offset = {}, 0
        for name in names:
            shape = self.target_shapes_[name]
            T = self.targets_[name].shape[1]
            for key, shp, size in ((f"{name}.weight", shape + (self.n_features_in_,), T * self.n_features_in_),
                                   (f"{name}.bias", shape, T)):
                nbytes = size * dtype.itemsize
                header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shp),
                               "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        header["__metadata__"] = {
            "alphas": json.dumps({k: self.alphas_[k] for k in names}), "solver": self.solver_,
            "decomposition": self.decomposition_,
            "note": "weights for normalised fMRI (normalise_fmri); post-hoc rescaling not included"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name in names:
                bias = np.empty(self.targets_[name].shape[1], dtype)
                for sl, w, b in self._iter_coef(name):
                    fh.write(np.ascontiguousarray(w.cpu().numpy(), dtype=dtype).tobytes())
                    bias[sl] = b.cpu().numpy()
                    del w
                fh.write(bias.tobytes())
        return Path(path)

    # ------------------------------------------------------------------ internals
    def _check_params(self) -> tuple[torch.device, torch.dtype]:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise UserError(f"MultiTargetRidge: invalid device {self.device!r} ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"MultiTargetRidge: device={self.device!r} but no CUDA GPU is available")
        if self.dtype not in (torch.float32, torch.float64):
            raise UserError(f"MultiTargetRidge: dtype must be torch.float32 or float64, got {self.dtype}")
        if not (isinstance(self.max_memory_gb, numbers.Real) and self.max_memory_gb > 0):
            raise UserError(f"MultiTargetRidge: max_memory_gb must be > 0, got {self.max_memory_gb!r}")
        if self.alphas is None and self.cv_alphas is None:
            raise UserError("MultiTargetRidge: give alphas or cv_alphas")
        if self.solver not in ("auto", "cholesky", "eigh"):
            raise UserError(f"MultiTargetRidge: solver must be 'auto', 'cholesky' or 'eigh', got {self.solver!r}")
        if self.solver == "cholesky" and self.cv_alphas is not None:
            raise UserError("MultiTargetRidge: cv_alphas needs solver='eigh' (or 'auto'): the leave-one-out "
                            "scores of every candidate alpha come from one eigendecomposition")
        return device, self.dtype

    def _choose_decomposition(self, alphas: dict[str, float]) -> tuple[str, str]:
        """("cholesky" | "eigh", the reason, for the log)."""
        if self.solver != "auto":
            return self.solver, f"solver={self.solver!r} requested"
        if self.cv_alphas is not None:
            return "eigh", "cross-validated alphas (every candidate from one eigendecomposition)"
        k = len(set(alphas.values()))
        if k > CHOLESKY_MAX_ALPHAS:
            return "eigh", f"{k} distinct alphas > {CHOLESKY_MAX_ALPHAS} (one eigendecomposition is cheaper)"
        return "cholesky", f"{k} fixed alpha{'s' if k > 1 else ''}, one Cholesky factorisation each"

    def _resolve_alphas(self, names: list[str]) -> dict[str, float]:
        if self.alphas is None:
            return {}
        if isinstance(self.alphas, Mapping):
            missing = sorted(set(names) - set(self.alphas))
            extra = sorted(set(self.alphas) - set(names))
            if missing or extra:
                raise UserError(f"ridge alphas: keys {sorted(self.alphas)} do not match the target "
                                f"groups {names} (missing {missing}, unknown {extra})")
            alphas = {k: self.alphas[k] for k in names}
        else:
            alphas = {k: self.alphas for k in names}
        for k, a in alphas.items():
            _check_alpha(a, f"ridge alpha for '{k}'")
        return {k: float(a) for k, a in alphas.items()}

    def _cv_grid(self, name: str) -> np.ndarray:
        grid = self.cv_alphas[name] if isinstance(self.cv_alphas, Mapping) else self.cv_alphas
        if isinstance(self.cv_alphas, Mapping) and name not in self.cv_alphas:
            raise UserError(f"cv_alphas has no entry for target group '{name}'")
        grid = np.atleast_1d(np.asarray(grid, dtype=np.float64))
        if grid.ndim != 1 or grid.size == 0:
            raise UserError(f"cv_alphas for '{name}' must be a non-empty list of floats")
        for a in grid:
            _check_alpha(a, f"cv alpha for '{name}'")
        return grid

    def _check_fitted(self) -> None:
        if not hasattr(self, "decomposition_"):
            raise RuntimeError("MultiTargetRidge is not fitted yet: call fit(X, targets) first")

    def _check_name(self, name: str) -> None:
        if name not in self.targets_:
            raise UserError(f"unknown target group '{name}' (fitted: {sorted(self.targets_)})")

    def _cholesky(self, alpha: float) -> torch.Tensor:
        """Lower Cholesky factor of G + αI (G itself is left exactly as it was).

        Kept between calls only when the model has a single alpha (e.g. the iCNN decoder predicts
        its layers one call at a time); with several, each factor lives only while it is used, so
        at most one extra (r, r) matrix is held.
        """
        cached = self.__dict__.get("_factor")
        if cached is not None and cached[0] == alpha:
            return cached[1]
        diag = self.gram_.diagonal()  # a view: α is added in place, saving an (r, r) copy
        saved = diag.clone()
        diag += alpha
        try:
            L, info = torch.linalg.cholesky_ex(self.gram_)
        finally:
            diag.copy_(saved)
        if int(info) != 0:
            raise UserError(f"ridge: G + alpha*I is not positive definite in {self.dtype_} for alpha={alpha:g} "
                            f"(alpha too small for the scale of X?); use MultiTargetRidge(solver='eigh')")
        if len(set(self.alphas_.values())) == 1:
            self._factor = (alpha, L)
        return L

    def _operators(self, Zt: torch.Tensor, alphas: Sequence[float]) -> dict[float, torch.Tensor]:
        """{alpha: M_α (m, n)} for centred test rows Zt (m, p)."""
        ops = {}
        if self.decomposition_ == "eigh":
            if self.solver_ == "dual":
                proj = (Zt @ self.train_centred_.T) @ self.sample_basis_
            else:
                proj = Zt @ self.feature_basis_
            for alpha in alphas:
                ops[alpha] = (proj / (self.eigvals_ + alpha)) @ self.sample_basis_.T
            return ops
        Xc = self.train_centred_
        rhs = Xc @ Zt.T if self.solver_ == "dual" else Zt.T  # (n, m) kernel rows or (p, m)
        for alpha in alphas:
            L = self._cholesky(alpha)
            sol = torch.cholesky_solve(rhs, L)
            del L
            ops[alpha] = sol.T if self.solver_ == "dual" else sol.T @ Xc.T
        return ops

    def _chunk_size(self, per_col_bytes: float, n_cols: int) -> int:
        budget = int(self.max_memory_gb * 2**30 // max(per_col_bytes, 1))
        return int(max(1, min(n_cols, MAX_CHUNK_COLUMNS, budget)))

    def _iter_centred(self, name: str, per_col: float, what: str, dtype: torch.dtype | None = None
                      ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (columns, Yc (n, c), ȳ (c,), std ddof=0 (c,)) on the device, one chunk at a time,
        in ``dtype`` (default: the solver's).

        The next chunk is read by background threads while the caller works on this one (row blocks
        in parallel: a memory-mapped target file that is not in the page cache is read with several
        requests in flight), so at most two host chunks are alive.
        """
        Y = self.targets_[name]
        T = Y.shape[1]
        c = self._chunk_size(per_col, T)
        slices = [slice(s, min(s + c, T)) for s in range(0, T, c)]
        n = Y.shape[0]
        rows = [slice(r, min(r + -(-n // _READ_THREADS), n)) for r in range(0, n, -(-n // _READ_THREADS))]

        def read(sl: slice, pool: ThreadPoolExecutor) -> tuple[np.ndarray, list]:
            # a fresh array: centring in place must never touch the caller's array
            host = np.empty((n, sl.stop - sl.start), dtype=Y.dtype)

            def part(r: slice) -> None:
                host[r] = Y[r, sl]

            def whole() -> None:  # array-likes such as reconstruct.icnn.decode.RowSubset support [:, columns] only
                host[:] = Y[:, sl]

            if isinstance(Y, np.ndarray):
                return host, [pool.submit(part, r) for r in rows]
            return host, [pool.submit(whole)]

        with ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="ridge-read") as pool:
            pending = read(slices[0], pool)
            for k in tqdm(range(len(slices)), desc=f"ridge {what} {name}", unit="chunk", leave=False,
                          disable=not self.progress or len(slices) == 1):
                sl = slices[k]
                host, parts = pending
                for f in parts:
                    f.result()
                pending = read(slices[k + 1], pool) if k + 1 < len(slices) else None
                Yc = torch.from_numpy(host).to(device=self.device_, dtype=dtype or self.dtype_)
                del host
                y_mean = Yc.mean(dim=0)  # NaN/inf propagate into the column mean: a check without a mask
                bad = ~torch.isfinite(y_mean)
                if bad.any():
                    col = sl.start + int(torch.nonzero(bad)[0])
                    raise UserError(f"target '{name}': NaN or inf in column {col} of the flattened target "
                                    f"(trailing shape {self.target_shapes_[name]})")
                Yc -= y_mean
                y_std = torch.linalg.vector_norm(Yc, dim=0) / math.sqrt(Yc.shape[0])  # ddof=0, no temp
                yield sl, Yc, y_mean, y_std
                del Yc  # callers drop theirs too, so only one device chunk is ever alive

    def _iter_coef(self, name: str) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (rows, W chunk (c, p), intercept chunk (c,)): the primal weights, chunk by chunk.

        dual: W = Xcᵀ (G + αI)⁻¹ Yc; primal: W = (G + αI)⁻¹ Xcᵀ Yc (written with the eigenbasis
        as F diag(1/(λ+α)) Bᵀ Yc when ``decomposition_ == "eigh"``).
        """
        Y = self.targets_[name]
        el = _itemsize(self.dtype_)
        n, p = self.n_samples_, self.n_features_in_
        r = min(n, p)
        per_col = n * (Y.dtype.itemsize + el) + r * el + p * (el + 8)
        alpha = self.alphas_[name]
        if self.decomposition_ == "cholesky":
            L, Xc = self._cholesky(alpha), self.train_centred_
            if self.solver_ == "dual":
                def weights(Yc):
                    return (Xc.T @ torch.cholesky_solve(Yc, L)).T
            else:
                def weights(Yc):
                    return torch.cholesky_solve(Xc.T @ Yc, L).T
        else:
            inv = 1.0 / (self.eigvals_ + alpha)
            B = self.sample_basis_

            def weights(Yc):
                A = inv[:, None] * (B.T @ Yc)
                if self.solver_ == "dual":
                    return (self.train_centred_.T @ (B @ A)).T
                return (self.feature_basis_ @ A).T
        for sl, Yc, y_mean, _ in self._iter_centred(name, per_col, "weights"):
            w = weights(Yc)
            del Yc
            yield sl, w, y_mean - w @ self.x_mean_
            del w

    def _loo_scores(self, name: str, grid: np.ndarray) -> np.ndarray:
        """Mean squared leave-one-out error of the group for each alpha in ``grid``.

        With hat matrix H = 11ᵀ/n + E diag(1/(λ+α)) Bᵀ (E = Xc F, i.e. B·diag(λ) in the dual form and
        B in the primal form), the LOO residual is (Y − HY)_i / (1 − H_ii) — exact for penalised
        least squares with an unpenalised intercept.
        """
        lam, B = self.eigvals_, self.sample_basis_
        E = B * lam if self.solver_ == "dual" else B
        EB = E * B  # (n, r); diag(H) = 1/n + EB @ (1/(λ+α))
        n, r = B.shape
        el = _itemsize(self.dtype_)
        per_col = n * (self.targets_[name].dtype.itemsize + 4 * el) + r * el * 2
        sse = np.zeros(len(grid))
        for _, Yc, _, _ in self._iter_centred(name, per_col, "cv"):
            G = B.T @ Yc
            for i, alpha in enumerate(grid):
                inv = 1.0 / (lam + alpha)
                h = 1.0 / n + EB @ inv
                resid = (Yc - E @ (inv[:, None] * G)) / (1.0 - h)[:, None]
                sse[i] += float(resid.square().sum())
                del resid
            del Yc, G
        return sse / (n * self.targets_[name].shape[1])


# --------------------------------------------------------------------------- validation helpers

def _check_matrix(a, what: str) -> np.ndarray:
    """A finite 2-D numeric array (no copy for ndarrays)."""
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    if a.ndim != 2:
        raise UserError(f"{what}: expected a 2-D array (n_samples, n_voxels), got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise UserError(f"{what}: empty array of shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise UserError(f"{what}: expected a numeric array, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(np.asarray(a)))[0]
        raise UserError(f"{what}: contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return a


def _check_targets(targets: Mapping[str, np.ndarray], n: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """{group: (n, ...)} -> ({group: (n, T) view}, {group: trailing shape}); never copies memmaps."""
    if not isinstance(targets, Mapping) or not targets:
        raise UserError("ridge targets: expected a non-empty dict {group name: array (n_samples, ...)}")
    views, shapes = {}, {}
    for name, Y in targets.items():
        if not isinstance(name, str) or not name or "." in name:
            raise UserError(f"ridge targets: group names must be non-empty strings without '.', got {name!r}")
        if not hasattr(Y, "shape"):
            Y = np.asarray(Y)
        if Y.ndim < 1 or Y.shape[0] != n:
            raise UserError(f"target '{name}': has {Y.shape[0] if Y.ndim else 0} rows (shape "
                            f"{tuple(Y.shape)}) but X has {n}: rows must be the same images in the same order")
        if not (np.issubdtype(Y.dtype, np.floating) or np.issubdtype(Y.dtype, np.integer)):
            raise UserError(f"target '{name}': expected a numeric array, got dtype {Y.dtype}")
        trailing = tuple(Y.shape[1:])
        T = math.prod(trailing)
        if T == 0:
            raise UserError(f"target '{name}': empty feature shape {trailing}")
        # a C-contiguous array (np.load / memmap) reshapes to a view; anything else is copied once
        views[name] = Y.reshape(n, T)
        shapes[name] = trailing
    return views, shapes


def _check_alpha(a, what: str) -> None:
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (math.isfinite(a) and a > 0):
        raise UserError(f"{what} must be a finite number > 0, got {a!r}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
