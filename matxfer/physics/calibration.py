"""Standardisation and linear calibration of descriptors, fitted on training rows only.

The calibration is least squares, or Huber's robust regression (quadratic loss for residuals
within HUBER_EPSILON robust standard deviations, linear beyond: heavy-tailed targets such as
jdft2d's exfoliation energies pull it less).

Pure numpy: descriptors x [N, d] (NaN where a descriptor failed), targets y [N] in task units
(regression: the calibration is linear in the target itself, y ≈ z @ w + b, even when the model
learns log(y): a physical proxy is proportional to the property, not to its log) or 0/1 class
labels (logistic: the calibration gives logits).
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-6  # keeps the least squares solvable when a descriptor is constant or all NaN
HUBER_EPSILON = 1.35  # 95% efficiency on Gaussian residuals (Huber 1964; scikit-learn's default)
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a Gaussian


def standardisation(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], std [d]) of each column over its finite entries; a column without finite
    entries gets (0, 1), a constant one std 1."""
    x = np.where(np.isfinite(x_train), x_train, np.nan)
    finite = np.isfinite(x).any(axis=0)
    mean = np.where(finite, np.nanmean(np.where(finite, x, 0.0), axis=0), 0.0)
    std = np.where(finite, np.nanstd(np.where(finite, x, 0.0), axis=0), 1.0)
    return mean, np.where(std > 0, std, 1.0)


def standardised(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std with NaN (a failed descriptor) replaced by 0, the training mean."""
    z = (x - mean) / std
    return np.where(np.isfinite(z), z, 0.0)


def fit_linear(z: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
               ) -> tuple[np.ndarray, float]:
    """(Weighted) least squares y ≈ z @ w + b: (w [d], b); weights [N] default to 1."""
    a = np.hstack([z, np.ones((len(z), 1))])
    sw = np.ones(len(z)) if weights is None else weights
    reg = RIDGE * float(sw.sum()) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    coef = np.linalg.solve((a * sw[:, None]).T @ a + reg, (a * sw[:, None]).T @ y)
    return coef[:-1], float(coef[-1])


def fit_huber(z: np.ndarray, y: np.ndarray, epsilon: float = HUBER_EPSILON,
              steps: int = 100) -> tuple[np.ndarray, float]:
    """Huber regression y ≈ z @ w + b by iteratively reweighted least squares: (w [d], b).
    Each step rescales the residuals by their robust spread (1.4826 x median absolute
    deviation) and weighs a residual r by min(1, epsilon / |r|), starting from least squares."""
    w, b = fit_linear(z, y)
    for _ in range(steps):
        r = y - z @ w - b
        scale = MAD_TO_STD * float(np.median(np.abs(r - np.median(r))))
        if scale <= 1e-12 * (1.0 + float(np.abs(y).max(initial=0.0))):
            break  # an exact fit of the bulk of the rows: nothing left to reweigh
        weights = np.minimum(1.0, epsilon * scale / np.maximum(np.abs(r), 1e-300))
        w_new, b_new = fit_linear(z, y, weights)
        converged = np.abs(np.append(w_new - w, b_new - b)).max() < 1e-10 * (1.0 + scale)
        w, b = w_new, b_new
        if converged:
            break
    return w, b


def fit_logistic(z: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50
                 ) -> tuple[np.ndarray, float]:
    """Logistic regression of 0/1 labels by Newton's method with a small L2 penalty on w:
    (w [d], b), logit = z @ w + b."""
    a = np.hstack([z, np.ones((len(z), 1))])
    coef = np.zeros(a.shape[1])
    penalty = l2 * len(z) * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(a @ coef)))
        grad = a.T @ (p - y) + penalty @ coef
        hess = (a * (p * (1 - p))[:, None]).T @ a + penalty + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        coef -= step
        if np.abs(step).max() < 1e-10:
            break
    return coef[:-1], float(coef[-1])


def calibrate(x_train: np.ndarray, y_train: np.ndarray, classification: bool,
              method: str = "linear") -> dict[str, np.ndarray]:
    """Everything the model needs: standardisation (mean, std [d]) and the calibration
    (w [d], b []: task units or logits) of the descriptors to the target, and `floor` (half the
    smallest training target: where a log-target model clips the calibration), from training
    rows only. `method`: "linear" (least squares) or "huber"; classification is logistic."""
    mean, std = standardisation(x_train)
    z = standardised(x_train, mean, std)
    y = np.asarray(y_train, dtype=np.float64)
    fit = fit_logistic if classification else {"linear": fit_linear, "huber": fit_huber}[method]
    w, b = fit(z, y)
    floor = 0.5 * y.min() if len(y) and y.min() > 0 else 1e-12
    return {"mean": mean, "std": std, "w": w, "b": np.asarray(b), "floor": np.asarray(floor)}
