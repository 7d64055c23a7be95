"""TransRate (Huang et al. 2022): mutual information between features and a target, per layer.

Pure functions on arrays. With Z the preprocessed features [n, d] and ε² the distortion,
    R(Z)    = ½·logdet(I + Zᵀ Z / (n ε²))              (coding rate, nats)
    R(Z|Y)  = Σ_c (n_c / n) · R(Z_c)                   (rate within each class c)
    TrR     = R(Z) − R(Z|Y),   normalised TrR / R(Z) ∈ [0, 1]   (the paper's I(Z;Y)/H(Z)).
Regression targets are cut into quantile bins first. R(Z_c) keeps each class's mean direction,
so even features that encode the label perfectly score about 1 − ½·log(1 + 1/ε²)/R(Z) < 1;
the ceiling rises with the number of classes (bins), and small classes (n_c < d) read low.
"""

from __future__ import annotations

import numpy as np

EPS2 = 1e-4


def preprocess(z: np.ndarray) -> np.ndarray:
    """The reference preprocessing of features [n, d]: rows L2-normalised, centred, L2 again."""
    z = np.asarray(z, dtype=np.float64)
    z = z / np.clip(np.linalg.norm(z, axis=1, keepdims=True), 1e-12, None)
    z = z - z.mean(axis=0, keepdims=True)
    return z / np.clip(np.linalg.norm(z, axis=1, keepdims=True), 1e-12, None)


def coding_rate(z: np.ndarray, eps2: float = EPS2) -> float:
    """R(Z, ε) = ½·logdet(I + Zᵀ Z / (n ε²)) for z [n, d], in nats; uses the smaller Gram."""
    n, d = z.shape
    gram = z.T @ z if d <= n else z @ z.T  # logdet(I_d + c ZᵀZ) = logdet(I_n + c ZZᵀ)
    _, logdet = np.linalg.slogdet(np.eye(gram.shape[0]) + gram / (n * eps2))
    return 0.5 * float(logdet)


def quantile_labels(y: np.ndarray, bins: int = 10) -> np.ndarray:
    """Regression targets [n] -> integer bin labels [n] with about n/bins members each."""
    y = np.asarray(y, dtype=np.float64)
    edges = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


def target_labels(y: np.ndarray, kind: str, bins: int = 10) -> np.ndarray:
    """Class labels for TransRate: quantile bins for regression, the labels as they are else."""
    if kind == "regression":
        return quantile_labels(y, bins)
    return np.asarray(y).astype(np.int64)


def transrate(z: np.ndarray, labels: np.ndarray, eps2: float = EPS2,
              preprocessed: bool = False) -> tuple[float, float]:
    """(TrR, R(Z)) of features z [n, d] against integer labels [n], class weights n_c/n."""
    z = z if preprocessed else preprocess(z)
    labels = np.asarray(labels)
    n = len(labels)
    rate = coding_rate(z, eps2)
    within = sum((labels == c).sum() / n * coding_rate(z[labels == c], eps2)
                 for c in np.unique(labels))
    return rate - within, rate


def layer_transrate(features: dict[str, np.ndarray], y: np.ndarray, kind: str,
                    bins: int = 10, eps2: float = EPS2) -> list[dict]:
    """Per layer {layer, transrate (nats), coding_rate, normalized} for features {name: [n, d]}."""
    labels = target_labels(y, kind, bins)
    rows = []
    for layer, z in features.items():
        trr, rate = transrate(z, labels, eps2)
        rows.append({"layer": layer, "transrate": trr, "coding_rate": rate,
                     "normalized": trr / rate if rate > 0 else 0.0,
                     "n": len(labels), "classes": int(len(np.unique(labels)))})
    return rows
