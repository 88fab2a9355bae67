"""AUC intervals: the bootstrap against cases known in closed form."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from apa.errors import ConfigError
from apa.metrics import _aucs, _resamples, auc, bootstrap_ci, intervals, paired_bootstrap, selection_score


def delong_interval(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong's 95% normal interval of the AUC (DeLong, DeLong & Clarke-Pearson 1988), written out."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [n_pos, n_neg]
    value = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    return value - 1.959964 * se, value + 1.959964 * se


def synthetic(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.55).astype(int)
    return labels, rng.normal(size=n) + shift * labels


def test_resampled_auc_is_the_mann_whitney_statistic() -> None:
    labels, scores = synthetic(300, 0.5, 1)
    scores = np.round(scores, 1)  # ties, averaged like sklearn
    rows = _resamples(labels, 5, seed=3)
    got = _aucs(labels, scores, rows)
    want = [roc_auc_score(labels[r], scores[r]) for r in rows]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert all(labels[r].sum() == labels.sum() for r in rows)  # stratified: the class counts are kept


def test_bootstrap_interval_matches_delong_on_a_large_sample() -> None:
    labels, scores = synthetic(3000, 0.6, 7)
    low, high = bootstrap_ci(labels, scores, resamples=2000)
    d_low, d_high = delong_interval(labels, scores)
    assert low < auc(labels, scores) < high
    assert low == pytest.approx(d_low, abs=0.005) and high == pytest.approx(d_high, abs=0.005)


def test_degenerate_cases() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    assert bootstrap_ci(labels, np.array([0.1, 0.2, 0.8, 0.9, 0.7])) == (1.0, 1.0)  # perfectly separated
    scores = np.array([0.3, 0.6, 0.2, 0.9, 0.5])
    assert paired_bootstrap(labels, scores, scores.copy()) == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError):
        bootstrap_ci(np.array([1, 1]), np.array([0.2, 0.3]))


def test_paired_interval_is_narrower_than_either_and_deterministic() -> None:
    labels, scores = synthetic(800, 0.6, 11)
    rng = np.random.default_rng(0)
    better, worse = scores + 0.3 * rng.normal(size=800), scores + 0.9 * rng.normal(size=800)
    diff, low, high = paired_bootstrap(labels, better, worse)
    assert diff == pytest.approx(auc(labels, better) - auc(labels, worse), abs=1e-12)
    assert 0 < low < diff < high
    (b_low, b_high), (w_low, w_high) = bootstrap_ci(labels, better), bootstrap_ci(labels, worse)
    assert high - low < min(b_high - b_low, w_high - w_low)
    ci, paired = intervals(labels, {"better": better, "worse": worse}, [("better", "worse"), ("better", "absent")])
    assert ci["better"] == [round(b_low, 4), round(b_high, 4)]
    assert paired == {"better-worse": [round(diff, 4), round(low, 4), round(high, 4)]}
    assert intervals(labels, {"better": better}, [])[0] == intervals(labels, {"better": better}, [])[0]


def test_selection_score_is_auc_or_minus_log_loss() -> None:
    assert selection_score(np.array([0, 1]), np.array([0.2, 0.7])) == 1.0
    assert selection_score(np.array([1, 1]), np.array([0.5, 0.5])) == pytest.approx(math.log(0.5))
