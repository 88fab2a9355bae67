"""Which validation samples choose an adapter's epoch (its best epoch on validation, TALLRec's rule).

A semantic shard is a specialist of its cluster: it is judged on the validation samples nearest its
centre, unless they lack ``MIN_PER_CLASS`` of a label. Everything else (SISA's shards, the single
adapter, shards of other partitions) is judged on all of them. The choice is recorded in each version's
manifest (``replay.selection``), which is also why a deletion of one of those samples retrains the shard.
"""

from pathlib import Path

import numpy as np

from apa.embeddings import cosine
from apa.samples import Sample

MIN_PER_CLASS = 2  # a cluster's validation samples judge its shard only with this many of each label


def valid_clusters(memory_file: Path, centres: np.ndarray | None) -> dict[str, int]:
    """Validation sample id -> its nearest centre (cosine; ``centres`` [K, hidden], unit rows), read from the
    validation memory; empty for a run without centres."""
    if centres is None:
        return {}
    with np.load(memory_file) as data:
        ids = [str(s) for s in data["sample_ids"]]
        nearest = np.argmax(cosine(data["embeddings"], centres), axis=1)  # [m]
    return dict(zip(ids, nearest.tolist(), strict=True))


def selection_samples(memory_file: Path, centres: np.ndarray | None, adapter: int | str,
                      valid: list[Sample]) -> tuple[list[Sample], str]:
    """The validation samples that pick ``adapter``'s epoch, and which they are (``cluster`` or ``all``)."""
    if isinstance(adapter, int) and centres is not None:
        clusters = valid_clusters(memory_file, centres)
        own = [s for s in valid if clusters.get(s.sample_id) == adapter]
        liked = sum(s.label for s in own)
        if min(liked, len(own) - liked) >= MIN_PER_CLASS:
            return own, "cluster"
    return list(valid), "all"
