"""TransRate estimators against hand-computed values and known answers."""

import numpy as np
import pytest

from matxfer.analysis.mutual_info import (
    coding_rate,
    layer_transrate,
    preprocess,
    quantile_labels,
    transrate,
)


def test_coding_rate_by_hand():
    # Z = I_2, n = 2, ε² = 1: ½·logdet(I + I/2) = log 1.5
    assert coding_rate(np.eye(2), eps2=1.0) == pytest.approx(np.log(1.5))
    # one row (1, 1), n = 1, ε² = 0.5: ZᵀZ = [[1,1],[1,1]], det(I + 2 ZᵀZ) = 5
    assert coding_rate(np.array([[1.0, 1.0]]), eps2=0.5) == pytest.approx(0.5 * np.log(5.0))


def test_coding_rate_uses_either_gram_side_consistently():
    z = np.random.default_rng(0).normal(size=(5, 20))
    direct = 0.5 * np.linalg.slogdet(np.eye(20) + z.T @ z / (5 * 1e-2))[1]
    assert coding_rate(z, 1e-2) == pytest.approx(direct)


def test_preprocessing_rows_unit_norm_and_scale_free():
    z = np.random.default_rng(1).normal(size=(50, 6)) + 3.0
    p = preprocess(z)
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0)
    assert np.allclose(preprocess(z * 7.5), p)


def test_quantile_bins_hold_equal_counts():
    labels = quantile_labels(np.arange(100.0), bins=10)
    assert np.bincount(labels).tolist() == [10] * 10


def test_features_that_encode_the_label_give_normalised_mi_near_one():
    # each class keeps its mean direction in R(Z_c) = ½·log(1 + 1/ε²) ≈ 4.6, so with K classes
    # a perfect code scores about 1 − 4.6 / R(Z); with 64 classes that is above 0.95
    rng = np.random.default_rng(2)
    y = rng.integers(0, 64, size=4000)
    centers = rng.normal(size=(64, 64)) * 5
    z = centers[y] + 1e-3 * rng.normal(size=(4000, 64))
    trr, rate = transrate(z, y)
    assert trr / rate > 0.95
    within = rate - trr
    assert within == pytest.approx(0.5 * np.log(1 + 1 / 1e-4), rel=1e-2)


def test_independent_noise_gives_normalised_mi_near_zero():
    rng = np.random.default_rng(3)
    z, y = rng.normal(size=(4000, 8)), rng.integers(0, 2, size=4000)
    trr, rate = transrate(z, y)
    assert 0 <= trr / rate < 0.02


def test_scaling_features_changes_nothing_and_regression_is_binned():
    rng = np.random.default_rng(4)
    y = rng.normal(size=300)
    z = np.c_[y, rng.normal(size=(300, 5))]
    a = layer_transrate({"l": z}, y, "regression", bins=5)[0]
    b = layer_transrate({"l": 10.0 * z}, y, "regression", bins=5)[0]
    assert a["normalized"] == pytest.approx(b["normalized"]) and a["classes"] == 5
    noise = layer_transrate({"l": rng.normal(size=(300, 6))}, y, "regression", bins=5)[0]
    assert a["transrate"] > noise["transrate"] >= 0
