"""``apa train``: dataset → samples → split → embeddings → partition → one LoRA per shard (+ baselines).

Besides the K served shards a run trains two baselines that are never served: ``single`` (one
adapter on all training samples) and ``sisa`` (SISA: one adapter per shard of a *random* partition of
the same samples, same K and seed; a run whose own partition is random is its own SISA).

Every adapter is validated after each epoch and kept at its best (``training.train_adapter``): a
semantic shard on the validation samples of its own cluster (those whose nearest K-means centre is
the shard's; a cluster specialist's global AUC says little), the baselines on all of them.

A run can be resumed: called again with the same ``--out`` and configuration, it keeps every adapter
version already written, continues an unfinished adapter from its last finished epoch, and trains
only what is missing.
"""

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apa import artifacts, data, sisa, training
from apa.aggregation import ValidationMemory
from apa.embeddings import EmbeddingCache, embed, normalise_rows
from apa.errors import ConfigError
from apa.hashing import sha256_file
from apa.metrics import selection_score
from apa.model import BaseModel
from apa.partition import NEEDS_EMBEDDINGS, partition
from apa.samples import Sample, build_samples, from_frame, labels, split_samples, to_frame
from apa.selection import selection_samples

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
    min_history: int = 10  # TALLRec: every prompt carries ten earlier items
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
    sisa_of: dict[str, int]  # train sample id -> shard of SISA's random partition
    centres: np.ndarray | None  # [K, hidden] the semantic partition's unit centres

    def shard_samples(self, shard: int) -> list[Sample]:
        return [s for s in self.splits["train"] if self.shard_of[s.sample_id] == shard]

    def adapter_samples(self, adapter: int | str) -> list[Sample]:
        """The training samples of a shard, of a SISA shard (``sisa-<k>``) or of ``single``."""
        if adapter == artifacts.SINGLE:
            return list(self.splits["train"])
        k = sisa.shard_of(adapter)
        if k is not None:
            return [s for s in self.splits["train"] if self.sisa_of[s.sample_id] == k]
        return self.shard_samples(int(adapter))

    def own_sisa(self) -> bool:
        """Whether the run's own shards are SISA's (a random partition)."""
        return self.config.partition == "random"

    def with_samples(self, extra: Sequence["ExtraSample"]) -> "RunData":
        """The run with samples it was not trained with (online learning: their content and prompts come
        from the ledger), appended to their splits; a sample the run holds already is not added twice."""
        known = {s.sample_id for split in self.splits.values() for s in split}
        new = [e for e in extra if e.sample.sample_id not in known]
        if not new:
            return self
        splits = {name: [*items, *(e.sample for e in new if e.split == name)] for name, items in self.splits.items()}
        return replace(
            self, splits=splits,
            shard_of={**self.shard_of, **{e.sample.sample_id: e.shard for e in new
                                          if e.split == "train" and e.shard is not None}},
            prompts={**self.prompts, **{e.sample.sample_id: e.prompt for e in new}},
            history_prompts={**self.history_prompts, **{e.sample.sample_id: e.history_prompt for e in new}})


@dataclass(frozen=True)
class ExtraSample:
    """A sample from outside the run folder, with its split, shard and frozen prompts."""

    split: str
    shard: int | None
    sample: Sample
    prompt: str
    history_prompt: str


def embedding_cache(run_dir: Path, base: BaseModel) -> EmbeddingCache:
    return EmbeddingCache(run_dir / "cache" / "embeddings", base.sha256)


def memory_path(run_dir: Path) -> Path:
    return run_dir / "memory" / "valid.npz"


def read_run(run_dir: Path) -> RunData:
    doc = artifacts.read_json(artifacts.require_run(run_dir) / "run.json")
    frame = pd.read_parquet(run_dir / "samples.parquet")
    config = RunConfig.from_dict(doc["config"])
    splits = from_frame(frame)
    train = frame[frame["split"] == "train"]
    if "sisa_shard" in frame:
        sisa_of = dict(zip(train["sample_id"].astype(str), train["sisa_shard"].astype(int), strict=True))
    else:  # runs written before the SISA baseline: its partition of the (unpurged) training split
        sisa_of = sisa.partition_of(splits["train"], config.shards, config.seed)
    return RunData(
        config=config,
        splits=splits,
        shard_of=dict(zip(train["sample_id"].astype(str), train["shard"].astype(int), strict=True)),
        prompts=dict(zip(frame["sample_id"].astype(str), frame["prompt"], strict=True)),
        history_prompts=dict(zip(frame["sample_id"].astype(str), frame["history_prompt"], strict=True)),
        base_model_sha256=str(doc["base_model"]["sha256"]),
        sisa_of=sisa_of,
        centres=None if doc.get("centres") is None else np.asarray(doc["centres"], dtype=np.float32),
    )


def _centres_json(centres: np.ndarray) -> list[list[float]]:
    return np.asarray(centres).round(6).tolist()


def write_centres(run_dir: Path, centres: np.ndarray) -> None:
    """Replace ``run.json``'s centres ([K, hidden], atomically). After a deletion they are recomputed from
    the live members (``worker.centres``): the K-means fit saw the deleted samples, and subtracting the
    remaining members from a centre fitted with one rebuilds its embedding. Assignments do not change."""
    path = artifacts.require_run(run_dir) / "run.json"
    artifacts.write_json_atomic(path, {**artifacts.read_json(path), "centres": _centres_json(centres)})


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
                          batch_size=cfg.batch_size, desc="embed train", noun=cfg.noun)
    else:
        train_emb = np.zeros((len(train), 0), dtype=np.float32)
    parts = partition(cfg.partition, train, train_emb, k=cfg.shards, seed=cfg.seed)
    shard_of = {s.sample_id: int(k) for s, k in zip(train, parts.assignment, strict=True)}

    valid = splits["valid"]
    valid_emb = embed(base, [prompts[s.sample_id] for s in valid], cache=cache,
                      batch_size=cfg.batch_size, desc="embed valid", noun=cfg.noun)
    valid_hist = embed(base, [history[s.sample_id] for s in valid], cache=cache,
                       batch_size=cfg.batch_size, desc="embed valid histories",
                       noun=cfg.noun)
    ValidationMemory(
        sample_ids=tuple(s.sample_id for s in valid), embeddings=normalise_rows(valid_emb),
        history_embeddings=normalise_rows(valid_hist),
        labels=np.array([s.label for s in valid], dtype=np.int64), predictions=np.zeros((len(valid), 0)),
    ).save(memory_path(run_dir))

    frame = to_frame(splits, shard_of)
    sisa_of = shard_of if cfg.partition == "random" else sisa.partition_of(train, cfg.shards, cfg.seed)
    frame["sisa_shard"] = [sisa_of.get(i, -1) for i in frame["sample_id"]]
    frame["prompt"] = [prompts[i] for i in frame["sample_id"]]
    frame["history_prompt"] = [history[i] for i in frame["sample_id"]]
    frame.to_parquet(run_dir / "samples.parquet", index=False)
    artifacts.owner_only(run_dir / "samples.parquet")
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
        "centres": None if parts.centres is None else _centres_json(parts.centres),
    })
    log.info("prepared run %s: shard sizes %s", run_dir, sizes)
    return read_run(run_dir)


def adapter_seed(run: RunData, adapter: int | str) -> int:
    """The seed an adapter trains with: (run seed, shard); SISA's shard k takes a random run's shard k's."""
    return training.derive_seed(run.config.seed, sisa.seed_key(adapter))


def fit_adapter(
    run: RunData, base: BaseModel, adapter: int | str, samples: list[Sample], select: list[Sample],
    *, checkpoint: Path | None = None, desc: str | None = None,
) -> tuple[Any, training.TrainStats]:
    """Train one adapter from scratch on ``samples`` (in this order: it decides the batches), its epoch
    chosen on ``select`` (none: the fixed schedule). Everything else comes from the run's config and
    the adapter's seed, so the same arguments give the same adapter (``apa verify`` replays it)."""
    cfg = run.config

    def validate(model: Any) -> training.EpochScore:
        scores = training.predict(base, model, [run.prompts[s.sample_id] for s in select],
                                  batch_size=cfg.batch_size)
        return training.EpochScore(score=selection_score(labels(select), np.array(scores)),
                                   predictions={s.sample_id: p for s, p in zip(select, scores, strict=True)})

    train_cfg = cfg.train if select else replace(cfg.train, patience=None)
    return training.train_adapter(
        base, [run.prompts[s.sample_id] for s in samples], [s.label for s in samples], train_cfg,
        seed=adapter_seed(run, adapter), validate=validate, checkpoint=checkpoint, desc=desc,
    )


def train_version(
    run: RunData, run_dir: Path, base: BaseModel, shard: int | str, samples: list[Sample],
    valid: list[Sample] | None = None, gate: Callable[[dict[str, float]], None] | None = None,
    resumable: bool = False,
) -> tuple[int, Path]:
    """Train one adapter from scratch on ``samples``, kept at its best epoch on validation
    (``selection_samples``), and write it as the adapter's next version.

    Every version carries its p(yes) on every validation sample in ``valid`` (default: the run's
    validation split), which the aggregation memory reads. ``gate(predictions)`` may raise to refuse
    the version before it is written. ``resumable`` keeps each epoch's state under ``cache/train`` so
    an interrupted training continues where it stopped (``apa train``; the worker starts afresh).
    With no validation sample left, training falls back to the fixed schedule (the manifest says so).
    The manifest's ``replay`` names what a replay needs beyond the hashed fields (``apa.replay``).
    """
    cfg = run.config
    k = sisa.shard_of(shard)
    name = {artifacts.SINGLE: "single"}.get(str(shard), f"shard {shard}" if k is None else f"SISA shard {k}")
    valid = run.splits["valid"] if valid is None else valid
    select, judged_on = selection_samples(memory_path(run_dir), run.centres, shard, valid)
    doc = artifacts.manifest(shard=shard, samples=samples, config=cfg.train.as_dict(), seed=adapter_seed(run, shard),
                             base_model_sha256=base.sha256)
    checkpoint = run_dir / "cache" / "train" / f"{shard}-{doc['manifest_sha256'][:16]}" if resumable else None
    model, stats = fit_adapter(run, base, shard, samples, select, checkpoint=checkpoint,
                               desc=f"train {name} ({len(samples)} samples)")
    known = stats.best.predictions if stats.best is not None else {}
    rest = [s for s in valid if s.sample_id not in known]
    scores = training.predict(base, model, [run.prompts[s.sample_id] for s in rest], batch_size=cfg.batch_size,
                              desc=f"validate {name}" if rest else None)
    predictions = {**known, **{s.sample_id: p for s, p in zip(rest, scores, strict=True)}}
    predictions = {s.sample_id: predictions[s.sample_id] for s in valid}  # validation order
    if gate is not None:
        gate(predictions)
    doc["training"] = {**stats.summary(), "selection": {"on": judged_on if select else "none",
                                                         "samples": len(select)}}
    doc["replay"] = training.replay_record(order=[s.sample_id for s in samples],
                                           selection=[s.sample_id for s in select])

    def fill(folder: Path) -> None:
        training.save_adapter(model, folder)
        doc["adapter_sha256"] = sha256_file(folder / training.ADAPTER_WEIGHTS)
        artifacts.write_json_atomic(folder / "valid_predictions.json", predictions)

    written = artifacts.write_version(run_dir, shard, fill, doc)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return written


def train_run(
    cfg: RunConfig, run_dir: Path, base: BaseModel, *, datasets_dir: Path, assets_dir: Path,
    single: bool = True, with_sisa: bool = True,
) -> RunData:
    """Train (or resume) a whole run: the shards, then the baselines asked for. Returns what the run
    folder holds."""
    artifacts.private_dir(run_dir)
    artifacts.clean_temp(run_dir)
    if (run_dir / "run.json").is_file():
        run = read_run(run_dir)
        if run.config != cfg:
            raise ConfigError(f"{run_dir} holds a run with another configuration; pick a new --out")
        if run.base_model_sha256 != base.sha256:
            raise ConfigError(f"{run_dir} was started with another base model")
    else:
        dataset = data.load(cfg.dataset, datasets_dir=datasets_dir, assets_dir=assets_dir)
        run = _prepare(cfg, run_dir, base, dataset)
    adapters: list[int | str] = list(range(cfg.shards))
    if single:
        adapters.append(artifacts.SINGLE)
    if with_sisa and not run.own_sisa():
        adapters += sisa.adapter_ids(cfg.shards, own=False)
    for adapter in adapters:
        if artifacts.latest_version(run_dir, adapter) is None:
            train_version(run, run_dir, base, adapter, run.adapter_samples(adapter), resumable=True)
    return run
