"""Ranking metrics shared by evaluation, aggregation and the validation gate."""

import numpy as np
from sklearn.metrics import roc_auc_score

from apa.errors import ConfigError


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` against 0/1 ``labels``; both classes must be present."""
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ConfigError("AUC needs both liked and disliked samples")
    return float(roc_auc_score(labels, scores))
