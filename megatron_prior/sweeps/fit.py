"""Power-law fits of held-out loss against training tokens (and model size), numpy only.

``L(D) = E + B * D**-beta`` is linear in (E, B) once beta is fixed, so the fit profiles the
exponent out: for every candidate beta, (E, B) come from closed-form least squares, and the
exponent is found by a log-spaced grid search that then zooms in on the best cell (robust to
the flat, nearly degenerate valleys these fits have, which derivative-based solvers wander in).
The Chinchilla form ``L(N, D) = E + A * N**-alpha + B * D**-beta`` is done the same way over
(alpha, beta). A and B are kept positive: a loss that rises with data or size has no power law,
and the fit says so (FitError) instead of returning a meaningless exponent.

The error minimised is the relative one, sum(((y - f) / f)**2) (weights 1/f from a first pass
weighted by 1/y): the spread of a loss over seeds grows with the loss, and fitting relative
error is the least-squares cousin of fitting log-loss, as the Chinchilla paper did.

Confidence intervals come from a residual bootstrap: refit on fitted values times (1 +
resampled relative residuals), the residuals inflated by sqrt(n / (n - parameters)) for the
degrees of freedom the fit used. Resampling points instead would, with the 4-6 budgets a sweep
has, often drop whole budgets and leave too few distinct ones to fit. Like every bootstrap of a
nonlinear fit from a dozen points, the intervals run somewhat narrow (a nominal 95 % covers
the true exponent about 85-90 % of the time on synthetic curves; see tests/test_sweeps_fit.py).

Precision: the profiled error is computed as |y|^2 - (projection), a difference of float64
sums, so near its minimum it is flat to within ~n * eps of the data's scale and the exponent
of even an exact law is pinned to ~sqrt(eps) times the fit's conditioning (1e-6 relative on
typical budgets), not to eps; which point of that window the search returns depends on the
BLAS kernel's summation order. tests/test_sweeps_fit.py derives its tolerances from this.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

BETA_BOUNDS = (1e-3, 5.0)
_MAX_CHUNK_ELEMENTS = 2_000_000  # bootstrap samples x grid points per numpy call


class FitError(ValueError):
    """The data admit no power law of the requested form (or too few points to fit one)."""


# ----------------------------------------------------------------------------- core solver


def _profile_linear(columns: np.ndarray, y: np.ndarray,
                    w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of ``y ~ c + columns @ coef`` for a batch of designs, coef > 0.

    Minimises sum_i (w_i * (y_i - c - columns_i @ coef))**2. columns: [b or 1, g, n, m]
    (b bootstrap samples, g exponent candidates, n points, m terms; a leading 1 shares one
    design among all samples, which is what makes the full grid cheap); y: [b, n]; w: [n],
    shared. Returns (intercept [b, g], coef [b, g, m], weighted sse [b, g]); sse is +inf where
    the design is singular or a coefficient is not positive.
    """
    m = columns.shape[-1]
    share = w * w / (w * w).sum()
    mean_col = np.einsum("bgnm,n->bgm", columns, share)       # weighted column means
    xc = (columns - mean_col[:, :, None, :]) * w[:, None]
    ym = y @ share
    yc = (y - ym[:, None]) * w                                 # [b, n]
    gram = np.swapaxes(xc, -1, -2) @ xc                        # [., g, m, m]
    # Exponents near 0 make columns nearly constant: solve in the column-normalised basis.
    scale = np.sqrt(np.diagonal(gram, axis1=-2, axis2=-1))     # [., g, m]
    safe_scale = np.where(scale > 0, scale, 1.0)
    g_n = gram / (safe_scale[..., :, None] * safe_scale[..., None, :])
    singular = (scale <= 0).any(axis=-1) | (np.abs(np.linalg.det(g_n)) < 1e-12)
    g_inv = np.linalg.inv(np.where(singular[..., None, None], np.eye(m), g_n))
    rhs = (np.swapaxes(xc, -1, -2) @ yc[:, None, :, None])[..., 0] / safe_scale   # [b, g, m]
    coef_n = (g_inv @ rhs[..., None])[..., 0]
    coef = coef_n / safe_scale
    # sse = |yc|^2 - rhs . coef: no [b, g, n] residual array, and y's centring keeps it exact enough.
    sse = np.maximum((yc * yc).sum(axis=1)[:, None] - (rhs * coef_n).sum(axis=-1), 0.0)
    sse = np.where(singular | (coef <= 0).any(axis=-1), np.inf, sse)
    intercept = ym[:, None] - (mean_col * coef).sum(axis=-1)
    return intercept, coef, sse


def _zoom_search(columns_of: Callable[[np.ndarray], np.ndarray], y: np.ndarray, w: np.ndarray,
                 k: int, bounds: tuple[float, float], n_grid: int, n_zoom: int,
                 iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the weighted error over k exponents in a log-spaced box, for each row of y.

    ``columns_of(exponents [b or 1, g, k]) -> [b or 1, g, n, k]`` builds the design. A full grid
    first (the valley may be anywhere; its design is shared by all rows), then ``iters`` rounds
    of an n_zoom^k grid spanning one old step on each side of each row's best point; the best
    point is always on the new grid, so the error never increases.
    Returns (exponents [b, k], sse [b]).
    """
    log_lo, log_hi = np.log(bounds[0]), np.log(bounds[1])
    axis = np.linspace(log_lo, log_hi, n_grid)
    grid = np.stack(np.meshgrid(*[axis] * k, indexing="ij"), axis=-1).reshape(1, -1, k)
    offsets = np.linspace(-1.0, 1.0, n_zoom)
    zoom = np.stack(np.meshgrid(*[offsets] * k, indexing="ij"), axis=-1).reshape(1, -1, k)
    grid_columns = columns_of(np.exp(grid))
    chunk = max(1, _MAX_CHUNK_ELEMENTS // grid.shape[1])
    best_theta, best_sse = [], []
    for start in range(0, len(y), chunk):
        yb = y[start:start + chunk]
        rows = np.arange(len(yb))
        sse = _profile_linear(grid_columns, yb, w)[2]
        idx = np.argmin(sse, axis=1)
        center, low = grid[0, idx], sse[rows, idx]
        step = (log_hi - log_lo) / (n_grid - 1)
        for _ in range(iters):
            theta = np.clip(center[:, None, :] + zoom * step, log_lo, log_hi)
            sse = _profile_linear(columns_of(np.exp(theta)), yb, w)[2]
            idx = np.argmin(sse, axis=1)
            center, low = theta[rows, idx], sse[rows, idx]
            step = step * 2.0 / (n_zoom - 1)
        best_theta.append(np.exp(center))
        best_sse.append(low)
    return np.concatenate(best_theta), np.concatenate(best_sse)


def _columns(xs: list[np.ndarray], exps: np.ndarray) -> np.ndarray:
    """The power-law terms x_i ** -exp_i: xs k arrays [n], exps [., g, k] -> [., g, n, k]."""
    return np.stack([x[None, None, :] ** -exps[..., i:i + 1] for i, x in enumerate(xs)], axis=-1)


def _solve(xs: list[np.ndarray], y: np.ndarray, w: np.ndarray, bounds: tuple[float, float]):
    """Batch fit of y [b, n] = c + sum_i coef_i * xs_i ** -exp_i. Returns c, coef, exps, sse."""
    k = len(xs)
    # The full grid costs n_grid**k designs; 60 x 60 keeps the 2-exponent search fast.
    n_grid, n_zoom = (400, 9) if k == 1 else (60, 7)
    exps, sse = _zoom_search(lambda e: _columns(xs, e), y, w, k, bounds, n_grid, n_zoom)
    c, coef, _ = _profile_linear(_columns(xs, exps[:, None, :]), y, w)
    return c[:, 0], coef[:, 0, :], exps, sse


class _PointFit:
    """A law fitted to data: inputs normalised by their minimum, so exponents near 0 or large
    inputs (1e12 tokens) stay well scaled; ``coef`` is in those normalised units."""

    def __init__(self, inputs: list[np.ndarray], y: np.ndarray, bounds: tuple[float, float],
                 names: tuple[str, ...], no_fit: str):
        self.refs = [float(x.min()) for x in inputs]
        self.xs = [x / r for x, r in zip(inputs, self.refs)]
        self.y, self.names = y, names
        self.w = 1.0 / np.abs(y)
        for _ in range(2):  # weights 1/y, then 1/fitted: the relative error of the fit
            c, coef, exps, sse = _solve(self.xs, y[None, :], self.w, bounds)
            if not np.isfinite(sse[0]):
                raise FitError(f"{no_fit} (inputs {[x.tolist() for x in inputs]}, losses {y.tolist()})")
            self.c, self.coef, self.exps = float(c[0]), coef[0], exps[0]
            self.fitted = self.c + (self.coef * np.stack(self.xs, -1) ** -self.exps).sum(-1)
            if (self.fitted <= 0).any():
                raise FitError(f"the fitted loss is not positive everywhere: {self.fitted.tolist()}")
            self.w = 1.0 / self.fitted
        for name, value in zip(names, self.exps):
            if np.isclose(value, bounds, rtol=1e-6).any():
                raise FitError(f"the exponent {name} ran to its search bound ({value:.4g}, bounds "
                               f"{bounds}): the curve is flat, falls without bending, or falls faster at the "
                               "larger budgets than a power law can, so the data do not determine it; "
                               "more or wider budgets (or sizes) are needed")

    def params(self, coef_names: tuple[str, ...]) -> dict:
        out = {"E": self.c}
        for cname, ename, coef, exp, ref in zip(coef_names, self.names, self.coef, self.exps, self.refs):
            out[cname] = float(coef * ref ** exp)  # back to raw units: B * D**-beta
            out[ename] = float(exp)
        return out

    def quality(self) -> dict:
        sse = float(((self.y - self.fitted) ** 2).sum())
        sst = float(((self.y - self.y.mean()) ** 2).sum())
        return {"r2": 1.0 - sse / sst if sst > 0 else None, "rmse": float(np.sqrt(sse / len(self.y)))}

    def bootstrap(self, n_bootstrap: int, confidence: float, seed: int,
                  bounds: tuple[float, float]) -> Optional[dict]:
        """Percentile intervals of E and the exponents; None without residual degrees of freedom."""
        n, dof = len(self.y), len(self.y) - 1 - 2 * len(self.exps)
        if dof <= 0 or n_bootstrap <= 0:
            return None
        rng = np.random.default_rng(seed)
        rel = (self.y - self.fitted) / self.fitted * np.sqrt(n / dof)
        y_star = self.fitted[None, :] * (1.0 + rng.choice(rel, size=(n_bootstrap, n), replace=True))
        c_b, _, exps_b, sse_b = _solve(self.xs, y_star, self.w, bounds)
        ok = np.isfinite(sse_b)
        if ok.sum() < 2:
            return {"failed": int((~ok).sum())}
        tail = (1.0 - confidence) / 2.0 * 100.0
        out = {"failed": int((~ok).sum()),
               "E_ci": np.percentile(c_b[ok], [tail, 100 - tail]).tolist()}
        for i, name in enumerate(self.names):
            out[f"{name}_ci"] = np.percentile(exps_b[ok, i], [tail, 100 - tail]).tolist()
        return out


def _as_arrays(name_values: dict[str, Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in name_values.values()]
    first = next(iter(name_values))
    for name, a in zip(name_values, arrays):
        if len(a) != len(arrays[0]):
            raise FitError(f"{name} has {len(a)} values, {first} has {len(arrays[0])}")
        if not np.isfinite(a).all():
            raise FitError(f"{name} has non-finite values: {a.tolist()}")
        if (a <= 0).any():
            raise FitError(f"{name} must be positive, got {a.tolist()}")
    return arrays


def _with_ci(fit: _PointFit, coef_names: tuple[str, ...], law: str, n_bootstrap: int,
             confidence: float, seed: int, bounds: tuple[float, float]) -> dict:
    out = {"law": law, **fit.params(coef_names)}
    out.update({f"{name}_ci": None for name in fit.names})
    out["E_ci"] = None
    out.update(fit.quality())
    out["n_points"] = len(fit.y)
    boot = fit.bootstrap(n_bootstrap, confidence, seed, bounds)
    out["bootstrap"] = {"method": "relative residual", "samples": n_bootstrap,
                        "confidence": confidence, "seed": seed,
                        "failed": boot["failed"] if boot else None}
    if boot:
        out.update({k: v for k, v in boot.items() if k.endswith("_ci")})
    return out


# ----------------------------------------------------------------------------- L(D)


def power_law(tokens, E: float, B: float, beta: float) -> np.ndarray:
    """``E + B * D**-beta`` (evaluated as B * exp(-beta log D) to stay finite for huge D)."""
    return E + B * np.exp(-beta * np.log(np.asarray(tokens, dtype=np.float64)))


_NO_FIT_D = "no fit with B > 0: the loss does not fall with the token budget"


def fit_power_law(tokens: Sequence[float], losses: Sequence[float], *, n_bootstrap: int = 1000,
                  confidence: float = 0.95, seed: int = 0,
                  beta_bounds: tuple[float, float] = BETA_BOUNDS) -> dict:
    """Fit ``L(D) = E + B * D**-beta`` to (tokens, loss) points (repeated budgets allowed: seeds).

    Returns ``E``, ``B``, ``beta``, ``beta_ci`` and ``E_ci`` (bootstrap; ``None`` when the fit
    has no residual degrees of freedom), ``r2``, ``rmse``, ``n_points``, ``n_budgets`` and
    ``extrapolation_error``: the relative error, on the largest budget, of a fit made without
    it (``None`` with fewer than 4 distinct budgets; ``extrapolation`` has the details).
    Raises FitError when no power law fits.
    """
    d, y = _as_arrays({"tokens": tokens, "losses": losses})
    budgets = np.unique(d)
    if len(budgets) < 3:
        raise FitError(f"{len(budgets)} distinct token budget(s): L(D) = E + B * D**-beta has "
                       "three parameters and needs at least 3")
    fit = _PointFit([d], y, beta_bounds, ("beta",), _NO_FIT_D)
    out = _with_ci(fit, ("B",), "L(D) = E + B * D**-beta", n_bootstrap, confidence, seed,
                   beta_bounds)
    out.update(n_budgets=int(len(budgets)), extrapolation_error=None, extrapolation=None)
    if len(budgets) >= 4:
        last, keep = budgets[-1], d < budgets[-1]
        observed = float(y[~keep].mean())
        extra = {"tokens": float(last), "observed": observed}
        try:
            held = _PointFit([d[keep]], y[keep], beta_bounds, ("beta",), _NO_FIT_D).params(("B",))
        except FitError as err:
            extra["error"] = f"the fit without it failed: {err}"
        else:
            extra["predicted"] = float(power_law(last, held["E"], held["B"], held["beta"]))
            extra["relative_error"] = abs(extra["predicted"] - observed) / observed
            out["extrapolation_error"] = extra["relative_error"]
        out["extrapolation"] = extra
    return out


# ----------------------------------------------------------------------------- L(N, D)


def chinchilla_law(parameters, tokens, E: float, A: float, alpha: float, B: float,
                   beta: float) -> np.ndarray:
    """``E + A * N**-alpha + B * D**-beta``."""
    return (E + A * np.exp(-alpha * np.log(np.asarray(parameters, dtype=np.float64)))
            + B * np.exp(-beta * np.log(np.asarray(tokens, dtype=np.float64))))


_NO_FIT_ND = ("no fit with A, B > 0: the loss does not fall with both model size and token "
              "budget on this grid")


def fit_chinchilla(parameters: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                   *, n_bootstrap: int = 300, confidence: float = 0.95, seed: int = 0,
                   bounds: tuple[float, float] = BETA_BOUNDS) -> dict:
    """Fit ``L(N, D) = E + A * N**-alpha + B * D**-beta`` over a grid of sizes x budgets.

    Needs >= 3 model sizes and >= 3 budgets: with two sizes, E + A * N**-alpha takes only two
    values for three parameters (E, A, alpha), so alpha is not determined (likewise beta with
    two budgets). Returns E, A, alpha, alpha_ci, B, beta, beta_ci, r2, rmse, n_points and
    ``extrapolation_error``: the mean over sizes of the relative error, on the largest budget,
    of a fit made without that budget (``None`` with fewer than 4 budgets).
    """
    n_p, d, y = _as_arrays({"parameters": parameters, "tokens": tokens, "losses": losses})
    sizes, budgets = np.unique(n_p), np.unique(d)
    if len(sizes) < 3 or len(budgets) < 3:
        raise FitError(f"the Chinchilla form needs >= 3 model sizes and >= 3 token budgets to "
                       f"determine both exponents; the grid has {len(sizes)} size(s) and "
                       f"{len(budgets)} budget(s)")
    fit = _PointFit([n_p, d], y, bounds, ("alpha", "beta"), _NO_FIT_ND)
    out = _with_ci(fit, ("A", "B"), "L(N, D) = E + A * N**-alpha + B * D**-beta", n_bootstrap,
                   confidence, seed, bounds)
    out.update(extrapolation_error=None, extrapolation=None)
    if len(budgets) >= 4:
        last, keep = budgets[-1], d < budgets[-1]
        extra: dict = {"tokens": float(last)}
        try:
            held = _PointFit([n_p[keep], d[keep]], y[keep], bounds, ("alpha", "beta"),
                             _NO_FIT_ND).params(("A", "B"))
        except FitError as err:
            extra["error"] = f"the fit without it failed: {err}"
        else:
            errors = {}
            for size in np.unique(n_p[~keep]):
                observed = float(y[~keep & (n_p == size)].mean())
                predicted = float(chinchilla_law(size, last, **held))
                errors[str(int(size))] = abs(predicted - observed) / observed
            extra["relative_errors_by_parameters"] = errors
            extra["relative_error"] = float(np.mean(list(errors.values())))
            out["extrapolation_error"] = extra["relative_error"]
        out["extrapolation"] = extra
    return out


def predict(fit: dict, tokens, parameters=None) -> np.ndarray:
    """Evaluate a fit dict from fit_power_law (or fit_chinchilla, given ``parameters``)."""
    if "alpha" in fit:
        if parameters is None:
            raise ValueError("a Chinchilla fit needs the parameter count to predict")
        return chinchilla_law(parameters, tokens, fit["E"], fit["A"], fit["alpha"], fit["B"], fit["beta"])
    return power_law(tokens, fit["E"], fit["B"], fit["beta"])
