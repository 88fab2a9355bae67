"""SISA (Bourtoule et al., "Machine Unlearning", 2021), the exact-unlearning baseline APA is measured
against: K adapters, each trained from scratch on one part of a *random* partition of the same training
samples, their outputs averaged uniformly. Everything SISA-specific lives here.

* **Partition:** the ``random`` partitioner of ``partition.py`` (a seeded hash of the sample id, modulo
  K) with the run's K and seed, stored per sample as ``sisa_shard`` in ``samples.parquet``.
* **Seeds:** SISA's shard k trains with the seed of the run's shard k, so a run whose own partition is
  random *is* its own SISA: no second set of adapters is trained for it.
* **Adapter ids and folders:** ``sisa-<k>``, kept under ``<run>/sisa/shard-<k>/v<n>/`` (never served).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apa import artifacts
from apa.engines.base import AdapterRef
from apa.partition import partition
from apa.samples import Sample

NAME = "sisa"


def adapter_id(shard: int) -> str:
    """The adapter id of SISA's shard ``shard`` (``sisa-<k>``)."""
    return f"{NAME}-{shard}"


def shard_of(adapter: int | str) -> int | None:
    """``k`` for ``sisa-<k>``, else None."""
    if isinstance(adapter, str) and adapter.startswith(f"{NAME}-"):
        return int(adapter.removeprefix(f"{NAME}-"))
    return None


def seed_key(adapter: int | str) -> int | str:
    """What an adapter's training seed derives from: SISA's shard k takes shard k's."""
    k = shard_of(adapter)
    return adapter if k is None else k


def partition_of(train: Sequence[Sample], shards: int, seed: int) -> dict[str, int]:
    """Training sample id -> SISA shard: the random partition with the run's K and seed."""
    parts = partition("random", list(train), np.zeros((len(train), 0), dtype=np.float32), k=shards, seed=seed)
    return {s.sample_id: int(k) for s, k in zip(train, parts.assignment, strict=True)}


def adapter_ids(shards: int, *, own: bool) -> list[int | str]:
    """SISA's K adapter ids: the run's own shards when its partition is random (``own``), else ``sisa-<k>``."""
    return list(range(shards)) if own else [adapter_id(k) for k in range(shards)]


def refs(run_dir: Path, shards: int, *, own: bool) -> list[AdapterRef] | None:
    """The newest version of SISA's K adapters, numbered 0..K-1, or None if one is not trained."""
    ids = adapter_ids(shards, own=own)
    if any(artifacts.latest_version(run_dir, a) is None for a in ids):
        return None
    return artifacts.adapter_refs(run_dir, ids)
