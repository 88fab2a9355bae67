"""How a replica weighs its shards for a user: the live validation memory, the attention chosen on it,
and the per-user weights (apa.aggregation does the math; this keeps the state a replica serves with).

The memory is rebuilt from the serving versions' validation predictions when a version or the set of
live validation samples changes, and shrinks at once when a deletion drops validation samples; each
time the attention (error, knn, tau) is chosen again on it, leave one out.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apa import aggregation, artifacts
from apa.aggregation import ValidationMemory
from apa.engines.base import AdapterRef
from apa.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionInUse:
    """The validation memory and the attention used with it, replaced together."""

    memory: ValidationMemory
    setting: aggregation.Attention
    choice: aggregation.AttentionChoice | None  # None: too few validation samples to choose with


class Attention:
    def __init__(self, grid: aggregation.AttentionGrid, memory_file: Path, shards: int) -> None:
        self.grid, self.memory_file, self.shards = grid, memory_file, shards
        self.in_use: AttentionInUse | None = None  # None before the first refresh
        self._valid_ids: frozenset[str] = frozenset()
        self._files: tuple[int, ...] = ()

    def _stamps(self, refs: Sequence[AdapterRef]) -> tuple[int, ...]:
        """When the memory and the versions' predictions last changed: the worker adds ingested validation
        samples to them (the memory keeps a sample only once every serving version predicted it)."""
        files = [self.memory_file, *(ref.path / "valid_predictions.json" for ref in refs)]
        return tuple(path.stat().st_mtime_ns if path.is_file() else 0 for path in files)

    def refresh(self, refs: Sequence[AdapterRef], valid_ids: frozenset[str], *, versions_changed: bool) -> None:
        """Rebuild the memory from the serving versions ``refs`` if they, their predictions, the memory file
        or the live validation samples changed (or nothing is in use yet), and choose the attention on it."""
        files = self._stamps(refs)
        if versions_changed or valid_ids != self._valid_ids or files != self._files or self.in_use is None:
            predictions = [artifacts.read_json(ref.path / "valid_predictions.json") for ref in refs]
            memory = ValidationMemory.load(self.memory_file, predictions)
            self.in_use = self._choose(memory.without(set(memory.sample_ids) - valid_ids))
            self._valid_ids, self._files = valid_ids, files

    def drop(self, sample_ids: Sequence[str]) -> None:
        """Deleted validation samples leave the memory now, before the next ledger sync."""
        in_use = self.in_use
        if in_use is not None and sample_ids:
            self.in_use = self._choose(in_use.memory.without(set(sample_ids)))

    def _choose(self, memory: ValidationMemory) -> AttentionInUse:
        """Choose the attention on the (per-user) validation memory, leave one out; with too few
        samples to choose, the configured parts and the paper's for the rest."""
        grid = self.grid
        try:
            choice = aggregation.choose_attention(memory, mode="per-user", grid=grid)
        except ConfigError as exc:
            paper = aggregation.PAPER
            fallback = aggregation.Attention(
                error=grid.errors[0] if len(grid.errors) == 1 else paper.error,
                knn=grid.knns[0] if len(grid.knns) == 1 else paper.knn,
                tau=grid.taus[0] if len(grid.taus) == 1 else paper.tau)
            log.warning("attention: %s; using %s", exc, fallback.label())
            return AttentionInUse(memory, fallback, None)
        log.info("attention %s (leave-one-out validation AUC %.4f, %d samples)", choice.attention.label(),
                 choice.valid_auc, choice.samples)
        return AttentionInUse(memory, choice.attention, choice)

    def weights(self, history_embedding: np.ndarray, active: dict[int, int]) -> np.ndarray:
        """Per-user APA weights over the K shards, zero for those not ``active`` (shard -> version): [K]."""
        in_use = self.in_use
        mask = [s in active for s in range(self.shards)]
        if in_use is None or not in_use.memory.sample_ids:  # no validation evidence: uniform over the active
            return np.array(mask, dtype=np.float64) / max(1, sum(mask))
        return aggregation.weights(in_use.memory, history_embedding[None, :], mode="per-user",
                                   attention=in_use.setting, active=mask)[0]
