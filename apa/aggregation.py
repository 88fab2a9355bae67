"""Sample-adaptive aggregation weights (the "A" of APA), from a validation memory.

For a query, take its ``knn`` nearest validation samples (cosine on base-model embeddings);
``error_k`` = mean |label - p_k(yes)| of shard k's adapter on them; weights = softmax(-tau * error)
over the *active* shards (a quarantined shard gets weight 0). Paper: knn=20, tau=1000.

Two query kinds share the code:

* ``per-sample`` (the paper): the query is the sample's own prompt embedding, compared with the
  validation prompts' embeddings.
* ``per-user`` (the service): the query is the embedding of the user's history alone (no target),
  compared with the validation samples' history embeddings; all candidates of a request share it.

The paper fixes tau=1000. :func:`choose_tau` picks it on the validation memory instead: each
validation sample is weighted by its ``knn`` nearest *other* validation samples (leave one out, so
its own label never votes), and the tau whose weighted average of the shards' predictions ranks
the validation labels best (AUC) wins. tau=0 is the uniform average (SISA's weights).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from apa.embeddings import normalise_rows
from apa.errors import AllShardsQuarantined, ConfigError
from apa.metrics import auc

WeightsMode = Literal["per-sample", "per-user"]
WEIGHT_MODES: tuple[WeightsMode, ...] = ("per-sample", "per-user")
PAPER_TAU = 1000.0
TAU_GRID: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, PAPER_TAU)


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


def _bank(memory: ValidationMemory, mode: WeightsMode) -> np.ndarray:
    if len(memory.sample_ids) == 0:
        raise ConfigError("the validation memory is empty")
    return memory.embeddings if mode == "per-sample" else memory.history_embeddings  # [m, hidden]


def _mean_errors(memory: ValidationMemory, sims: np.ndarray, knn: int) -> np.ndarray:
    """Each row's mean |label - p_k| over its ``knn`` most similar memory samples: [n, K]."""
    n_near = min(knn, sims.shape[1])
    near = np.argpartition(-sims, n_near - 1, axis=1)[:, :n_near]  # [n, knn]
    errors = np.abs(memory.labels[:, None] - memory.predictions)  # [m, K]
    return errors[near].mean(axis=1)  # [n, K]


def shard_errors(memory: ValidationMemory, queries: np.ndarray, *, mode: WeightsMode, knn: int) -> np.ndarray:
    """Mean absolute error of each shard on each query's ``knn`` nearest validation samples: [n, K]."""
    return _mean_errors(memory, normalise_rows(queries) @ _bank(memory, mode).T, knn)


def loo_shard_errors(memory: ValidationMemory, *, mode: WeightsMode, knn: int) -> np.ndarray:
    """:func:`shard_errors` of every validation sample over the *other* validation samples: [m, K]."""
    bank = _bank(memory, mode)
    if bank.shape[0] < 2:
        raise ConfigError("leaving one out needs at least two validation samples")
    sims = bank @ bank.T  # [m, m], unit rows
    np.fill_diagonal(sims, -np.inf)  # never its own neighbour
    return _mean_errors(memory, sims, min(knn, bank.shape[0] - 1))


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
    memory: ValidationMemory, queries: np.ndarray, *, mode: WeightsMode = "per-sample", knn: int = 20,
    tau: float = PAPER_TAU, active: Sequence[bool] | None = None,
) -> np.ndarray:
    """APA weights of each query over the K shards: [n, K], rows sum to 1."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"unknown weights mode {mode!r}; choose from {WEIGHT_MODES}")
    if knn < 1 or tau < 0:
        raise ConfigError("knn must be >= 1 and tau >= 0")
    return attention_weights(shard_errors(memory, queries, mode=mode, knn=knn), tau=tau, active=active)


@dataclass(frozen=True)
class TauChoice:
    tau: float
    valid_auc: dict[float, float] = field(default_factory=dict)  # tau -> leave-one-out validation AUC


def choose_tau(memory: ValidationMemory, *, mode: WeightsMode = "per-sample", knn: int = 20,
               grid: Sequence[float] = TAU_GRID) -> TauChoice:
    """The tau of ``grid`` whose leave-one-out weighted average of the shards' validation predictions
    has the best validation AUC (the smaller tau on a tie)."""
    if not grid or min(grid) < 0:
        raise ConfigError("the tau grid must be non-empty and >= 0")
    errors = loo_shard_errors(memory, mode=mode, knn=knn)  # [m, K]
    scores = {tau: auc(memory.labels, (attention_weights(errors, tau=tau) * memory.predictions).sum(axis=1))
              for tau in sorted(grid)}
    best = max(scores, key=lambda tau: (scores[tau], -tau))
    return TauChoice(tau=best, valid_auc=scores)
