"""Standardisation and linear calibration of descriptors, fitted on training rows only.

Pure numpy: descriptors x [N, d] (NaN where a descriptor failed), targets y [N] in task units
(regression: the calibration is linear in the target itself, y ≈ z @ w + b, even when the model
learns log(y): a physical proxy is proportional to the property, not to its log) or 0/1 class
labels (logistic: the calibration gives logits).
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-6  # keeps the least squares solvable when a descriptor is constant or all NaN


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


def fit_linear(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares y ≈ z @ w + b: (w [d], b)."""
    a = np.hstack([z, np.ones((len(z), 1))])
    reg = RIDGE * len(z) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    coef = np.linalg.solve(a.T @ a + reg, a.T @ y)
    return coef[:-1], float(coef[-1])


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


def calibrate(x_train: np.ndarray, y_train: np.ndarray, classification: bool
              ) -> dict[str, np.ndarray]:
    """Everything the model needs: standardisation (mean, std [d]) and the calibration
    (w [d], b []: task units or logits) of the descriptors to the target, and `floor` (half the
    smallest training target: where a log-target model clips the calibration), from training
    rows only."""
    mean, std = standardisation(x_train)
    z = standardised(x_train, mean, std)
    y = np.asarray(y_train, dtype=np.float64)
    fit = fit_logistic if classification else fit_linear
    w, b = fit(z, y)
    floor = 0.5 * y.min() if len(y) and y.min() > 0 else 1e-12
    return {"mean": mean, "std": std, "w": w, "b": np.asarray(b), "floor": np.asarray(floor)}
