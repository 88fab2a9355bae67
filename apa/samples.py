"""TALLRec samples: (up to ``max_history`` most recent earlier items, one target item) per interaction.

Per user, interactions are ordered by (timestamp, item_id). History items rated above the like
threshold are "liked", the others "disliked"; the label is ``target rating > threshold``. Every sample
keeps the keys of all interactions it contains, so a deletion can find every sample it touches.
"""

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from apa import prompts
from apa.data import Dataset, interaction_key
from apa.errors import ConfigError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    sample_id: str  # the key of the target interaction
    user_id: str
    target_item_id: str
    label: int  # 1 = liked (target rating > threshold)
    history_item_ids: tuple[str, ...]  # oldest first
    history_liked: tuple[bool, ...]
    interaction_keys: tuple[str, ...]  # history keys (oldest first), then the target's key

    def prompt(self, titles: dict[str, str], *, noun: str = "movie") -> str:
        liked, disliked = self._split_history(titles)
        return prompts.sample_prompt(liked, disliked, titles[self.target_item_id], noun=noun)

    def history_prompt(self, titles: dict[str, str], *, noun: str = "movie") -> str:
        liked, disliked = self._split_history(titles)
        return prompts.history_prompt(liked, disliked, noun=noun)

    def _split_history(self, titles: dict[str, str]) -> tuple[list[str], list[str]]:
        liked = [titles[i] for i, ok in zip(self.history_item_ids, self.history_liked, strict=True) if ok]
        disliked = [titles[i] for i, ok in zip(self.history_item_ids, self.history_liked, strict=True) if not ok]
        return liked, disliked

    def content(self) -> dict[str, object]:
        """JSON-ready full content (what manifests hash)."""
        record = asdict(self)
        for name in ("history_item_ids", "history_liked", "interaction_keys"):
            record[name] = list(record[name])
        return record


def recent_history(
    history: Sequence[tuple[str, float]], titles: dict[str, str], *, max_history: int = 10,
    like_threshold: float = 3.0,
) -> tuple[list[str], list[str]]:
    """Liked and disliked titles among the ``max_history`` most recent (item_id, rating) pairs.

    The serving side of :meth:`Sample.prompt`: a user's live history, oldest first, as a query.
    """
    recent = history[-max_history:] if max_history else []
    liked = [titles[i] for i, rating in recent if rating > like_threshold]
    disliked = [titles[i] for i, rating in recent if rating <= like_threshold]
    return liked, disliked


def build_samples(
    dataset: Dataset, *, max_history: int = 10, min_history: int = 1, like_threshold: float = 3.0
) -> list[Sample]:
    """Every (history, target) sample of the dataset, in user then time order."""
    if not 1 <= min_history <= max_history:
        raise ConfigError(f"need 1 <= min_history ({min_history}) <= max_history ({max_history})")
    out: list[Sample] = []
    frame = dataset.interactions
    for user_id, group in frame.groupby("user_id", sort=True):
        timeline = list(zip(group["item_id"], group["rating"], group["timestamp"], strict=True))
        out.extend(user_samples(str(user_id), timeline, range(min_history, len(timeline)),
                                max_history=max_history, like_threshold=like_threshold))
    return out


def user_samples(
    user_id: str, timeline: Sequence[tuple[str, float, int]], positions: Iterable[int], *, max_history: int = 10,
    like_threshold: float = 3.0,
) -> list[Sample]:
    """The samples whose targets are ``timeline[position]`` for each position: ``timeline`` is the user's
    (item_id, rating, timestamp), ordered by (timestamp, item_id); each sample's history is the up to
    ``max_history`` interactions before its target. The one rule for a run's samples and ingested ones."""
    items = [str(item) for item, _, _ in timeline]
    liked = [float(rating) > like_threshold for _, rating, _ in timeline]
    keys = [interaction_key(user_id, item, int(t)) for item, _, t in timeline]
    out = []
    for position in positions:
        start = max(0, position - max_history)
        out.append(Sample(
            sample_id=keys[position],
            user_id=user_id,
            target_item_id=items[position],
            label=int(liked[position]),
            history_item_ids=tuple(items[start:position]),
            history_liked=tuple(liked[start:position]),
            interaction_keys=tuple(keys[start:position + 1]),
        ))
    return out


def ingested_split(sample_id: str, *, seed: int, valid_fraction: float) -> str:
    """``valid`` for a seeded ``valid_fraction`` of ingested samples, ``train`` for the rest: a hash of
    (seed, sample id), so the same sample always lands in the same split."""
    digest = hashlib.sha256(f"split:{seed}:{sample_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "valid" if draw < valid_fraction else "train"


def from_content(record: dict[str, object]) -> Sample:
    """A sample back from :meth:`Sample.content` (the ledger keeps ingested samples this way)."""
    def strings(name: str) -> tuple[str, ...]:
        return tuple(str(v) for v in record[name])  # type: ignore[attr-defined]

    return Sample(sample_id=str(record["sample_id"]), user_id=str(record["user_id"]),
                  target_item_id=str(record["target_item_id"]), label=int(record["label"]),  # type: ignore[call-overload]
                  history_item_ids=strings("history_item_ids"),
                  history_liked=tuple(bool(v) for v in record["history_liked"]),  # type: ignore[attr-defined]
                  interaction_keys=strings("interaction_keys"))


def split_samples(
    samples: Sequence[Sample], *, n_train: int, n_valid: int, n_test: int, seed: int
) -> dict[str, list[Sample]]:
    """A deterministic random draw of disjoint train/valid/test samples (the paper's setting)."""
    need = n_train + n_valid + n_test
    if min(n_train, n_valid, n_test) < 1:
        raise ConfigError("train, valid and test sizes must each be at least 1")
    if need > len(samples):
        raise ConfigError(f"asked for {need} samples but the dataset yields only {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))[:need]
    chosen = [samples[i] for i in order]
    return {
        "train": chosen[:n_train],
        "valid": chosen[n_train:n_train + n_valid],
        "test": chosen[n_train + n_valid:],
    }


def to_frame(splits: dict[str, list[Sample]], shards: dict[str, int] | None = None) -> pd.DataFrame:
    """The ``samples.parquet`` table: one row per sample, with its split and shard (-1 outside train)."""
    rows = []
    for split, items in splits.items():
        for sample in items:
            row = sample.content()
            row["split"] = split
            row["shard"] = (shards or {}).get(sample.sample_id, -1)
            rows.append(row)
    return pd.DataFrame(rows)


def from_frame(frame: pd.DataFrame) -> dict[str, list[Sample]]:
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for row in frame.itertuples(index=False):
        splits[str(row.split)].append(Sample(
            sample_id=str(row.sample_id),
            user_id=str(row.user_id),
            target_item_id=str(row.target_item_id),
            label=int(row.label),
            history_item_ids=tuple(str(i) for i in row.history_item_ids),
            history_liked=tuple(bool(x) for x in row.history_liked),
            interaction_keys=tuple(str(k) for k in row.interaction_keys),
        ))
    return splits


def labels(samples: Iterable[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)
