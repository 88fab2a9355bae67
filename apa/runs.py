"""``apa train``: dataset → samples → split → embeddings → partition → one LoRA per shard (+ single).

A run can be resumed: called again with the same ``--out`` and configuration, it keeps every adapter
version already written and trains only the missing ones.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apa import artifacts, data, training
from apa.aggregation import ValidationMemory
from apa.embeddings import EmbeddingCache, embed, normalise_rows
from apa.errors import ConfigError
from apa.model import BaseModel
from apa.partition import NEEDS_EMBEDDINGS, partition
from apa.samples import Sample, build_samples, from_frame, split_samples, to_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    dataset: str = data.MOVIELENS_100K
    shards: int = 4
    partition: str = "semantic"
    n_train: int = 1024
    n_valid: int = 500
    n_test: int = 1000
    seed: int = 0
    max_history: int = 10
    min_history: int = 1
    like_threshold: float = 3.0
    noun: str = "movie"
    batch_size: int = 8  # inference batches (embeddings, predictions)
    train: training.TrainConfig = field(default_factory=training.TrainConfig)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(**{**d, "train": training.TrainConfig.from_dict(d["train"])})


@dataclass(frozen=True)
class RunData:
    """What a run folder says about its samples."""

    config: RunConfig
    splits: dict[str, list[Sample]]
    shard_of: dict[str, int]  # train sample id -> shard
    prompts: dict[str, str]  # sample id -> prompt
    history_prompts: dict[str, str]  # sample id -> history-only prompt
    base_model_sha256: str

    def shard_samples(self, shard: int) -> list[Sample]:
        return [s for s in self.splits["train"] if self.shard_of[s.sample_id] == shard]


def embedding_cache(run_dir: Path, base: BaseModel) -> EmbeddingCache:
    return EmbeddingCache(run_dir / "cache" / "embeddings", base.sha256)


def memory_path(run_dir: Path) -> Path:
    return run_dir / "memory" / "valid.npz"


def read_run(run_dir: Path) -> RunData:
    doc = artifacts.read_json(artifacts.require_run(run_dir) / "run.json")
    frame = pd.read_parquet(run_dir / "samples.parquet")
    return RunData(
        config=RunConfig.from_dict(doc["config"]),
        splits=from_frame(frame),
        shard_of={str(r.sample_id): int(r.shard) for r in frame.itertuples() if r.split == "train"},
        prompts=dict(zip(frame["sample_id"].astype(str), frame["prompt"], strict=True)),
        history_prompts=dict(zip(frame["sample_id"].astype(str), frame["history_prompt"], strict=True)),
        base_model_sha256=str(doc["base_model"]["sha256"]),
    )


def _prepare(cfg: RunConfig, run_dir: Path, base: BaseModel, dataset: data.Dataset) -> RunData:
    """Samples, split, embeddings, partition and the validation memory; written once per run."""
    samples = build_samples(dataset, max_history=cfg.max_history, min_history=cfg.min_history,
                            like_threshold=cfg.like_threshold)
    splits = split_samples(samples, n_train=cfg.n_train, n_valid=cfg.n_valid, n_test=cfg.n_test, seed=cfg.seed)
    titles = dataset.titles
    prompts = {s.sample_id: s.prompt(titles, noun=cfg.noun) for split in splits.values() for s in split}
    history = {s.sample_id: s.history_prompt(titles, noun=cfg.noun) for split in splits.values() for s in split}
    cache = embedding_cache(run_dir, base)

    train = splits["train"]
    if cfg.partition in NEEDS_EMBEDDINGS:
        train_emb = embed(base, [prompts[s.sample_id] for s in train], cache=cache,
                          batch_size=cfg.batch_size, desc="embed train")
    else:
        train_emb = np.zeros((len(train), 0), dtype=np.float32)
    parts = partition(cfg.partition, train, train_emb, k=cfg.shards, seed=cfg.seed)
    shard_of = {s.sample_id: int(k) for s, k in zip(train, parts.assignment, strict=True)}

    valid = splits["valid"]
    valid_emb = embed(base, [prompts[s.sample_id] for s in valid], cache=cache,
                      batch_size=cfg.batch_size, desc="embed valid")
    valid_hist = embed(base, [history[s.sample_id] for s in valid], cache=cache,
                       batch_size=cfg.batch_size, desc="embed valid histories")
    ValidationMemory(
        sample_ids=tuple(s.sample_id for s in valid), embeddings=normalise_rows(valid_emb),
        history_embeddings=normalise_rows(valid_hist),
        labels=np.array([s.label for s in valid], dtype=np.int64), predictions=np.zeros((len(valid), 0)),
    ).save(memory_path(run_dir))

    frame = to_frame(splits, shard_of)
    frame["prompt"] = [prompts[i] for i in frame["sample_id"]]
    frame["history_prompt"] = [history[i] for i in frame["sample_id"]]
    frame.to_parquet(run_dir / "samples.parquet", index=False)
    sizes = np.bincount(parts.assignment, minlength=cfg.shards).tolist()
    artifacts.write_json_atomic(run_dir / "run.json", {
        "config": cfg.as_dict(),
        "seed": cfg.seed,
        "dataset": dataset.name,
        "base_model": {"name": base.name, "sha256": base.sha256},
        "created_at": datetime.now(UTC).isoformat(),
        "shard_sizes": sizes,
        "samples": {s.sample_id: {"split": split, "shard": shard_of.get(s.sample_id, -1)}
                    for split, items in splits.items() for s in items},
        "centres": None if parts.centres is None else parts.centres.round(6).tolist(),
    })
    log.info("prepared run %s: shard sizes %s", run_dir, sizes)
    return read_run(run_dir)


def train_version(
    run: RunData, run_dir: Path, base: BaseModel, shard: int | str, samples: list[Sample],
    valid: list[Sample] | None = None, gate: Callable[[dict[str, float]], None] | None = None,
) -> tuple[int, Path]:
    """Train one adapter from scratch on ``samples`` and write it as the shard's next version.

    Shard versions also carry their p(yes) on every validation sample in ``valid`` (default: the
    run's validation split), which the aggregation memory reads. ``gate(predictions)`` may raise to
    refuse the version before it is written.
    """
    cfg = run.config
    seed = training.derive_seed(cfg.seed, shard)
    name = "single" if shard == artifacts.SINGLE else f"shard {shard}"
    model, stats = training.train_adapter(
        base, [run.prompts[s.sample_id] for s in samples], [s.label for s in samples], cfg.train,
        seed=seed, desc=f"train {name} ({len(samples)} samples)",
    )
    valid = run.splits["valid"] if valid is None else valid
    predictions: dict[str, float] = {}
    if shard != artifacts.SINGLE:
        scores = training.predict(base, model, [run.prompts[s.sample_id] for s in valid],
                                  batch_size=cfg.batch_size, desc=f"validate {name}")
        predictions = {s.sample_id: p for s, p in zip(valid, scores, strict=True)}
        if gate is not None:
            gate(predictions)
    doc = artifacts.manifest(shard=shard, samples=samples, config=cfg.train.as_dict(), seed=seed,
                             base_model_sha256=base.sha256)
    doc["training"] = stats.summary()

    def fill(folder: Path) -> None:
        training.save_adapter(model, folder)
        if predictions:
            artifacts.write_json_atomic(folder / "valid_predictions.json", predictions)

    return artifacts.write_version(run_dir, shard, fill, doc)


def train_run(
    cfg: RunConfig, run_dir: Path, base: BaseModel, *, datasets_dir: Path, assets_dir: Path,
    single: bool = True,
) -> RunData:
    """Train (or resume) a whole run. Returns what the run folder holds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.clean_temp_dirs(run_dir)
    if (run_dir / "run.json").is_file():
        run = read_run(run_dir)
        if run.config != cfg:
            raise ConfigError(f"{run_dir} holds a run with another configuration; pick a new --out")
        if run.base_model_sha256 != base.sha256:
            raise ConfigError(f"{run_dir} was started with another base model")
    else:
        dataset = data.load(cfg.dataset, datasets_dir=datasets_dir, assets_dir=assets_dir)
        run = _prepare(cfg, run_dir, base, dataset)
    for shard in range(cfg.shards):
        if artifacts.latest_version(run_dir, shard) is None:
            train_version(run, run_dir, base, shard, run.shard_samples(shard))
    if single and artifacts.latest_version(run_dir, artifacts.SINGLE) is None:
        train_version(run, run_dir, base, artifacts.SINGLE, list(run.splits["train"]))
    return run
