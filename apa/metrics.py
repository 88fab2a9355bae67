"""Ranking metrics shared by evaluation, aggregation, training and the validation gate.

Intervals are stratified bootstraps: each resample draws the positives and the negatives separately,
with replacement, so every resample keeps the test set's class balance and has an AUC. A paired
interval resamples the same samples for both methods, so what they share cancels.
"""

from collections.abc import Mapping

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from apa.errors import ConfigError

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` against 0/1 ``labels``; both classes must be present."""
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ConfigError("AUC needs both liked and disliked samples")
    return float(roc_auc_score(labels, scores))


def valid_auc(predictions: Mapping[str, float], labels: Mapping[str, int]) -> float | None:
    """AUC on the validation samples both know, or None without both labels among them."""
    ids = [s for s in labels if s in predictions]
    if len({labels[s] for s in ids}) < 2:
        return None
    return auc(np.array([labels[s] for s in ids]), np.array([predictions[s] for s in ids]))


def selection_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """What picks a checkpoint on validation: AUC, or minus the log-loss when one class is missing."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) == 2:
        return auc(labels, scores)
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    return float(np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _resamples(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Index rows of ``n`` stratified bootstrap resamples: [n, len(labels)]."""
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0 or len(pos) + len(neg) != len(labels):
        raise ConfigError("a bootstrap of AUC needs 0/1 labels of both classes")
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(pos, (n, len(pos))), rng.choice(neg, (n, len(neg)))], axis=1)


def _aucs(labels: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` on each resample (Mann-Whitney: mean rank of the positives): [n]."""
    y = np.asarray(labels)[rows]  # [n, N]
    ranks = rankdata(np.asarray(scores, dtype=np.float64)[rows], axis=1)  # [n, N], ties averaged
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    return ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over stratified bootstrap resamples of the samples."""
    values = _aucs(labels, scores, _resamples(labels, resamples, seed))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> tuple[float, float, float]:
    """AUC(first) - AUC(second): the difference on the full set, and the percentile interval of the
    difference over resamples shared by both."""
    rows = _resamples(labels, resamples, seed)
    diffs = _aucs(labels, first, rows) - _aucs(labels, second, rows)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return auc(labels, first) - auc(labels, second), float(low), float(high)


def intervals(labels: np.ndarray, scores: Mapping[str, np.ndarray], pairs: list[tuple[str, str]], *,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``ci95`` (method -> [low, high]) and ``paired`` ("a-b" -> [difference, low, high]), rounded, every
    method on the same resamples."""
    ci = {m: [round(v, 4) for v in bootstrap_ci(labels, s, resamples=resamples, seed=seed)]
          for m, s in scores.items()}
    paired = {f"{a}-{b}": [round(v, 4) for v in paired_bootstrap(labels, scores[a], scores[b],
                                                                 resamples=resamples, seed=seed)]
              for a, b in pairs if a in scores and b in scores}
    return ci, paired
