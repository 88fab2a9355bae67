"""The validation gate a retrained shard version must pass before it serves.

A retrain runs on fewer samples than the version it replaces, so some loss of validation AUC is
expected; a version is refused when its predictions are not probabilities, or when its AUC on the
live validation samples falls more than ``max_auc_drop`` below the old version's on the same samples.
A refused version is never written; the shard stays quarantined (never rolled back).
"""

import math

from apa.errors import GateFailed
from apa.metrics import valid_auc


def check(new: dict[str, float], old: dict[str, float] | None, labels: dict[str, int], *,
          max_auc_drop: float) -> dict[str, float | None]:
    """Raise :class:`GateFailed` or return the metrics the decision used."""
    bad = [s for s, p in new.items() if not (math.isfinite(p) and 0.0 <= p <= 1.0)]
    if bad:
        raise GateFailed(f"{len(bad)} validation prediction(s) are not probabilities")
    new_auc = valid_auc(new, labels)
    old_auc = valid_auc({s: old[s] for s in new if s in old}, labels) if old else None
    if new_auc is not None and old_auc is not None and new_auc < old_auc - max_auc_drop:
        raise GateFailed(f"validation AUC {new_auc:.4f} is more than {max_auc_drop} below the old "
                         f"version's {old_auc:.4f}")
    return {"valid_auc": new_auc, "old_valid_auc": old_auc}
