"""The run in the ledger: importing a run folder's samples, interactions and adapter versions.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger.errors import LedgerError
from ledger.models import (
    SERVING,
    AdapterVersion,
    Forgotten,
    Interaction,
    Item,
    Run,
    Sample,
    SampleInteraction,
    Shard,
    new_interaction_id,
    utcnow,
)

if TYPE_CHECKING:  # types only: apa.data reaches the model-conversion code
    from apa.data import Dataset
    from apa.samples import Sample as TrainingSample


from ledger.common import chunks, write_audit


@dataclass(frozen=True)
class VersionRecord:
    shard: int
    version: int
    path: Path
    manifest_sha256: str
    n_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportSummary:
    created: bool
    interactions: int
    samples: int
    skipped_forgotten: int  # forgotten interactions and samples together (each a row not imported)
    versions_added: int


def get_run(*, session: Session) -> Run:
    run = session.scalars(select(Run)).first()
    if run is None:
        raise LedgerError("the ledger holds no run: train one (`apa train`) or `apa ledger import RUN_DIR`")
    return run


def import_run(
    *, session: Session, run_path: Path, dataset: "Dataset", splits: "dict[str, list[TrainingSample]]",
    shard_of: dict[str, int], config: dict[str, Any], base_model_name: str, base_model_sha256: str,
    versions: Sequence[VersionRecord], key: bytes, forgotten: set[str] | None = None,
) -> ImportSummary:
    """Record a run: its dataset, samples, shards and adapter versions. Safe to run again (adds new versions).

    Interactions whose HMAC is in the ledger's ``forgotten`` table or in ``forgotten`` (the run
    folder's own list) are not brought back, nor any sample that contains one.
    """
    run_path = run_path.resolve()
    existing = session.scalars(select(Run)).first()
    if existing is not None and Path(existing.path) != run_path:
        raise LedgerError(f"this ledger already serves the run {existing.path}; use another APA_DATABASE_URL")
    created = existing is None
    n_interactions = n_samples = skipped = 0
    if created:
        session.add(Run(path=str(run_path), dataset=dataset.name, shards=int(config["shards"]), config=config,
                        base_model_name=base_model_name, base_model_sha256=base_model_sha256))
        forgotten = set(session.scalars(select(Forgotten.hmac))) | (forgotten or set())
        session.execute(insert(Item), [{"item_id": str(r.item_id), "title": str(r.title)}
                                       for r in dataset.items.itertuples(index=False)])
        rows: list[dict[str, Any]] = []
        for r in dataset.interactions.itertuples(index=False):
            ikey = f"{r.user_id}:{r.item_id}:{int(r.timestamp)}"
            if hmac_hex(key, "interaction", ikey) in forgotten:
                skipped += 1
                continue
            rows.append({"id": new_interaction_id(), "key": ikey, "user_id": str(r.user_id),
                         "item_id": str(r.item_id), "rating": float(r.rating), "timestamp": int(r.timestamp)})
        rows.sort(key=lambda row: int(row["id"]))  # stored in the ids' (random) order, not the dataset's (user, time)
        for chunk in chunks(rows):
            session.execute(insert(Interaction), list(chunk))
        n_interactions = len(rows)
        ids = {str(k): int(i) for k, i in session.execute(select(Interaction.key, Interaction.id))}
        sample_rows: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        for split, samples in splits.items():
            for s in samples:
                if any(k not in ids for k in s.interaction_keys):
                    skipped += 1
                    continue
                sample_rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "split": split,
                                    "shard": shard_of.get(s.sample_id), "label": s.label})
                links.extend({"sample_id": s.sample_id, "interaction_id": ids[k]} for k in s.interaction_keys)
        for chunk in chunks(sample_rows):
            session.execute(insert(Sample), list(chunk))
        for chunk in chunks(links):
            session.execute(insert(SampleInteraction), list(chunk))
        n_samples = len(sample_rows)
        for k in range(int(config["shards"])):
            session.add(Shard(shard=k, state=SERVING))
        session.flush()
    known = {(v.shard, v.version) for v in session.scalars(select(AdapterVersion))}
    added = 0
    for record in sorted(versions, key=lambda v: (v.shard, v.version)):
        if (record.shard, record.version) in known:
            continue
        shard = session.get(Shard, record.shard)  # before the version row: its autoflush would fail the FK
        if shard is None:
            raise LedgerError(f"the run has no shard {record.shard}")
        session.add(AdapterVersion(shard=record.shard, version=record.version, path=str(record.path.resolve()),
                                   manifest_sha256=record.manifest_sha256, n_samples=record.n_samples,
                                   metrics=record.metrics, served_at=utcnow()))
        if shard.serving_version is None or (record.version > shard.serving_version and not shard.dirty):
            shard.serving_version = record.version
        added += 1
    write_audit(session=session, actor="cli", action="run.import",
                subject=run_path.name, detail={"interactions": n_interactions, "samples": n_samples,
                                               "versions_added": added, "skipped_forgotten": skipped})
    return ImportSummary(created=created, interactions=n_interactions, samples=n_samples,
                         skipped_forgotten=skipped, versions_added=added)
