"""Descriptor standardisation and calibration (pure numpy), checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from matxfer.physics.calibration import (
    calibrate,
    fit_huber,
    fit_linear,
    fit_logistic,
    standardisation,
    standardised,
)


def test_standardisation_ignores_nan_and_survives_empty_or_constant_columns():
    x = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, 5.0], [np.nan, np.nan, 5.0]])
    mean, std = standardisation(x)
    np.testing.assert_allclose(mean, [2.0, 0.0, 5.0])
    np.testing.assert_allclose(std, [1.0, 1.0, 1.0])  # sd of (1, 3) is 1; the others default
    z = standardised(np.array([[5.0, 7.0, np.nan]]), mean, std)
    np.testing.assert_allclose(z, [[3.0, 7.0, 0.0]])  # NaN -> 0, the training mean


def test_linear_calibration_recovers_a_line():
    z = np.linspace(-2, 2, 21)[:, None]
    w, b = fit_linear(z, 3.0 * z[:, 0] - 0.5)
    assert w[0] == pytest.approx(3.0, rel=1e-4) and b == pytest.approx(-0.5, abs=1e-6)


def test_logistic_calibration_orders_classes_and_matches_a_hand_value():
    z = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = np.array([0, 0, 1, 0, 1, 1.0])
    w, b = fit_logistic(z, y, l2=0.0)
    assert w[0] > 0
    # the maximum-likelihood condition: predicted and observed positives agree
    p = 1 / (1 + np.exp(-(z[:, 0] * w[0] + b)))
    assert p.sum() == pytest.approx(y.sum(), abs=1e-6)
    assert (p * z[:, 0]).sum() == pytest.approx((y * z[:, 0]).sum(), abs=1e-6)


def test_calibrate_uses_the_given_rows_only():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 10, size=(50, 2))
    y = 0.1 * (x[:, 0] - 100)
    cal = calibrate(x, y, classification=False)
    np.testing.assert_allclose(cal["mean"], x.mean(0))
    pred = standardised(x, cal["mean"], cal["std"]) @ cal["w"] + cal["b"]
    np.testing.assert_allclose(pred, y, atol=1e-3)
    assert abs(cal["w"][1]) < 1e-3  # the unrelated descriptor gets no weight


def test_huber_calibration_ignores_gross_outliers_that_pull_least_squares():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 1))
    y = 2.0 * z[:, 0] + 1.0 + rng.normal(0.0, 0.1, 200)
    y[:20] += 50.0  # 10% of the rows far above the line: a heavy tail
    w_ls, b_ls = fit_linear(z, y)
    w_h, b_h = fit_huber(z, y)
    assert abs(b_ls - 1.0) > 3.0  # least squares is pulled towards the tail
    # Huber's weights cap each outlier's pull at epsilon robust standard deviations: slope
    # and intercept stay within a few noise standard errors (0.1 / sqrt(180) ~ 0.01)
    assert w_h[0] == pytest.approx(2.0, abs=0.05) and b_h == pytest.approx(1.0, abs=0.05)


def test_huber_calibration_of_an_exact_line_is_the_line():
    z = np.linspace(-2, 2, 21)[:, None]
    w, b = fit_huber(z, 3.0 * z[:, 0] - 0.5)
    assert w[0] == pytest.approx(3.0, rel=1e-4) and b == pytest.approx(-0.5, abs=1e-6)


def test_huber_calibration_matches_the_weighted_least_squares_fixed_point():
    """At convergence the coefficients solve the weighted normal equations of their own
    Huber weights (IRLS's fixed point), which a hand computation of the weights checks."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(100, 2))
    y = z @ np.array([1.5, -0.7]) + 0.3 + rng.standard_t(2, 100)  # heavy-tailed noise
    w, b = fit_huber(z, y)
    r = y - z @ w - b
    scale = 1.4826 * np.median(np.abs(r - np.median(r)))
    weights = np.minimum(1.0, 1.35 * scale / np.abs(r))
    w_again, b_again = fit_linear(z, y, weights)
    np.testing.assert_allclose(np.append(w_again, b_again), np.append(w, b), atol=1e-8)


def test_calibrate_uses_the_named_method():
    x = np.linspace(0, 1, 50)[:, None]
    y = 10 * x[:, 0]
    y[-3:] += 100.0
    linear, huber = (calibrate(x, y, False, method) for method in ("linear", "huber"))
    assert abs(float(huber["b"]) - 5.0) < abs(float(linear["b"]) - 5.0)  # 5 = 10 x mean(x)
