"""Sample-adaptive aggregation weights (the "A" of APA), from a validation memory.

For a query, take its ``knn`` nearest validation samples (cosine on base-model embeddings);
``error_k`` = shard k's mean prediction error on them; weights = softmax(-tau * error) over the
*active* shards (a quarantined shard gets weight 0). The three numbers form an :class:`Attention`:

* ``error``: ``mae`` |y - p| (the paper's "prediction error"), ``brier`` (y - p)^2 or ``logloss``
  -log p(y). |y - p| rewards a shard that always leans to the majority answer as much as one that
  separates the labels; Brier and log-loss punish confident mistakes more.
* ``knn``: neighbours per query, or ``None`` for every memory sample.
* ``tau``: 0 is the uniform average (SISA's weights); large values route to one shard.

The paper fixes (mae, 20, 1000) for movies (:data:`PAPER`). At that setting the gaps between shards'
errors over 20 neighbours are below their noise and the weights are nearly one-hot, so a sample goes
where the noise points. :func:`choose_attention` chooses the three together on the validation memory
alone: each validation sample is weighted by its nearest *other* validation samples (leave one out,
so its own label never votes), and the setting whose weighted average of the shards' predictions
ranks the validation labels best (AUC) wins. Test labels never enter.

Two query kinds share the code:

* ``per-sample`` (the paper): the query is the sample's own prompt embedding, compared with the
  validation prompts' embeddings.
* ``per-user`` (the service): the query is the embedding of the user's history alone (no target),
  compared with the validation samples' history embeddings; all candidates of a request share it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apa.embeddings import cosine, normalise_rows
from apa.errors import AllShardsQuarantined, ConfigError
from apa.metrics import auc

WeightsMode = Literal["per-sample", "per-user"]
WEIGHT_MODES: tuple[WeightsMode, ...] = ("per-sample", "per-user")
_EPS = 1e-6


def _mae(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.abs(labels - p)


def _brier(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (labels - p) ** 2


def _logloss(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return -(labels * np.log(p) + (1 - labels) * np.log(1.0 - p))


ERRORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mae": _mae, "brier": _brier, "logloss": _logloss,
}
ERROR_GRID: tuple[str, ...] = tuple(ERRORS)
KNN_GRID: tuple[int | None, ...] = (10, 20, 50, 100, None)  # None: every memory sample
TAU_GRID: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass(frozen=True)
class Attention:
    """How a query's neighbours' errors become shard weights (see the module docstring)."""

    error: str = "mae"
    knn: int | None = 20  # None: every memory sample
    tau: float = 1000.0

    def __post_init__(self) -> None:
        if self.error not in ERRORS:
            raise ConfigError(f"unknown attention error {self.error!r}; choose from {sorted(ERRORS)}")
        if (self.knn is not None and self.knn < 1) or not self.tau >= 0:
            raise ConfigError("knn must be >= 1 (or all) and tau >= 0")

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.error, "knn": "all" if self.knn is None else self.knn, "tau": self.tau}

    def label(self) -> str:
        return f"{self.error}/{'all' if self.knn is None else self.knn}/{self.tau:g}"


PAPER = Attention("mae", 20, 1000.0)
PAPER_TAU = PAPER.tau


@dataclass(frozen=True)
class AttentionGrid:
    """The settings :func:`choose_attention` tries; a fixed component is a grid of one."""

    errors: tuple[str, ...] = ERROR_GRID
    knns: tuple[int | None, ...] = KNN_GRID
    taus: tuple[float, ...] = TAU_GRID

    def __post_init__(self) -> None:
        if not (self.errors and self.knns and self.taus):
            raise ConfigError("every component of the attention grid needs at least one value")
        for error in self.errors:  # validates each component through Attention's own checks
            Attention(error, self.knns[0], self.taus[0])
        for knn in self.knns:
            Attention(self.errors[0], knn, self.taus[0])
        for tau in self.taus:
            Attention(self.errors[0], self.knns[0], tau)

    def settings(self) -> list[Attention]:
        return [Attention(e, n, t) for e in self.errors for n in self.knns for t in self.taus]

    def as_dict(self) -> dict[str, list[Any]]:
        return {"errors": list(self.errors), "knns": ["all" if n is None else n for n in self.knns],
                "taus": list(self.taus)}


@dataclass(frozen=True)
class ValidationMemory:
    sample_ids: tuple[str, ...]  # [m]
    embeddings: np.ndarray  # [m, hidden] unit rows, full prompts
    history_embeddings: np.ndarray  # [m, hidden] unit rows, history-only prompts
    labels: np.ndarray  # [m] 0/1
    predictions: np.ndarray  # [m, K] p(yes) of each shard's serving version

    def save(self, path: Path) -> None:
        """Embeddings and labels only: predictions belong to adapter versions, not to the memory."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(handle, sample_ids=np.array(self.sample_ids), embeddings=self.embeddings,
                     history_embeddings=self.history_embeddings, labels=self.labels)

    @classmethod
    def load(cls, path: Path, predictions: Sequence[dict[str, float]]) -> "ValidationMemory":
        """Join the stored memory with each shard's per-sample predictions (shard order)."""
        data = np.load(path)
        ids = tuple(str(s) for s in data["sample_ids"])
        keep = [i for i, s in enumerate(ids) if all(s in p for p in predictions)]
        preds = np.array([[p[ids[i]] for p in predictions] for i in keep], dtype=np.float64)
        return cls(sample_ids=tuple(ids[i] for i in keep), embeddings=data["embeddings"][keep],
                   history_embeddings=data["history_embeddings"][keep], labels=data["labels"][keep],
                   predictions=preds.reshape(len(keep), len(predictions)))

    def without(self, sample_ids: set[str]) -> "ValidationMemory":
        """The memory minus some samples (a deletion drops the validation samples it touches)."""
        keep = [i for i, s in enumerate(self.sample_ids) if s not in sample_ids]
        return ValidationMemory(
            sample_ids=tuple(self.sample_ids[i] for i in keep), embeddings=self.embeddings[keep],
            history_embeddings=self.history_embeddings[keep], labels=self.labels[keep],
            predictions=self.predictions[keep],
        )

    def errors(self, error: str) -> np.ndarray:
        """Each shard's error on each memory sample: [m, K]."""
        return ERRORS[error](self.labels[:, None].astype(np.float64), self.predictions)


def _bank(memory: ValidationMemory, mode: WeightsMode) -> np.ndarray:
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"unknown weights mode {mode!r}; choose from {WEIGHT_MODES}")
    if len(memory.sample_ids) == 0:
        raise ConfigError("the validation memory is empty")
    return memory.embeddings if mode == "per-sample" else memory.history_embeddings  # [m, hidden]


def _nearest_first(sims: np.ndarray) -> np.ndarray:
    """Memory indices of each row, most similar first (ties by index): [n, m]."""
    return np.argsort(-sims, axis=1, kind="stable")


def _mean_over(errors: np.ndarray, order: np.ndarray, knn: int | None) -> np.ndarray:
    """Each row's mean error over its first ``knn`` (all if None) neighbours in ``order``: [n, K]."""
    n_near = order.shape[1] if knn is None else min(knn, order.shape[1])
    return errors[order[:, :n_near]].mean(axis=1)  # [n, K]


def shard_errors(memory: ValidationMemory, queries: np.ndarray, *, mode: WeightsMode,
                 attention: Attention = PAPER) -> np.ndarray:
    """Mean error of each shard on each query's nearest validation samples: [n, K]."""
    order = _nearest_first(cosine(normalise_rows(queries), _bank(memory, mode)))  # [n, m]
    return _mean_over(memory.errors(attention.error), order, attention.knn)


def _loo_order(memory: ValidationMemory, mode: WeightsMode) -> np.ndarray:
    """Every validation sample's *other* samples, nearest first: [m, m-1]."""
    bank = _bank(memory, mode)
    if bank.shape[0] < 2:
        raise ConfigError("leaving one out needs at least two validation samples")
    sims = cosine(bank, bank)  # [m, m], unit rows
    np.fill_diagonal(sims, -np.inf)  # never its own neighbour: it sorts last and is cut off
    return _nearest_first(sims)[:, :-1]


def loo_shard_errors(memory: ValidationMemory, *, mode: WeightsMode, attention: Attention = PAPER) -> np.ndarray:
    """:func:`shard_errors` of every validation sample over the *other* validation samples: [m, K]."""
    return _mean_over(memory.errors(attention.error), _loo_order(memory, mode), attention.knn)


def attention_weights(errors: np.ndarray, *, tau: float, active: Sequence[bool] | None = None) -> np.ndarray:
    """softmax(-tau * error) over active shards, 0 for quarantined ones: [n, K]."""
    mask = np.ones(errors.shape[1], dtype=bool) if active is None else np.asarray(active, dtype=bool)
    if not mask.any():
        raise AllShardsQuarantined("every shard is quarantined")
    logits = np.where(mask, -tau * errors, -np.inf)  # [n, K]
    logits = logits - logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def weights(
    memory: ValidationMemory, queries: np.ndarray, *, mode: WeightsMode = "per-sample",
    attention: Attention = PAPER, active: Sequence[bool] | None = None,
) -> np.ndarray:
    """APA weights of each query over the K shards: [n, K], rows sum to 1."""
    return attention_weights(shard_errors(memory, queries, mode=mode, attention=attention), tau=attention.tau,
                             active=active)


def entropy(w: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each weight row: 0 = one shard, log K = uniform: [n]."""
    safe = np.where(w > 0, w, 1.0)
    return -(w * np.log(safe)).sum(axis=1)


@dataclass(frozen=True)
class AttentionChoice:
    attention: Attention
    valid_auc: float  # its leave-one-out validation AUC
    samples: int  # validation samples it was chosen on
    table: dict[str, float]  # Attention.label() -> leave-one-out validation AUC, every setting tried

    def as_dict(self) -> dict[str, Any]:
        return {**self.attention.as_dict(), "loo_valid_auc": round(self.valid_auc, 4), "samples": self.samples}


def choose_attention(memory: ValidationMemory, *, mode: WeightsMode = "per-sample",
                     grid: AttentionGrid | None = None) -> AttentionChoice:
    """The setting of ``grid`` whose leave-one-out weighted average of the shards' validation
    predictions has the best validation AUC. Ties go to the smaller tau (closer to the uniform
    average), then the larger neighbourhood, then the grid's order of errors: the least noisy reading."""
    grid = grid or AttentionGrid()
    order = _loo_order(memory, mode)  # [m, m-1]
    m = order.shape[1]
    table: dict[Attention, float] = {}
    for error in grid.errors:
        errors = memory.errors(error)
        cumulative = np.cumsum(errors[order], axis=1)  # [m, m-1, K]: every knn from one pass
        for knn in grid.knns:
            n_near = m if knn is None else min(knn, m)
            mean = cumulative[:, n_near - 1] / n_near  # [m, K]
            for tau in grid.taus:
                w = attention_weights(mean, tau=tau)
                table[Attention(error, knn, tau)] = auc(memory.labels, (w * memory.predictions).sum(axis=1))

    def preference(a: Attention) -> tuple[float, float, int, int]:
        return table[a], -a.tau, m if a.knn is None else min(a.knn, m), -grid.errors.index(a.error)

    best = max(table, key=preference)
    return AttentionChoice(attention=best, valid_auc=table[best], samples=len(memory.sample_ids),
                           table={a.label(): round(v, 4) for a, v in table.items()})
