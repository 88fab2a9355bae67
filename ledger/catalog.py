"""Reads for /recommend and /admin/status: histories, titles, popularity, shards, live samples, counts;
and the versions whose folders may be on disk.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger.common import chunks, version_row
from ledger.errors import UserNotFound
from ledger.models import (
    AdapterVersion,
    DeletionRequest,
    Interaction,
    Item,
    Sample,
    Shard,
    as_utc,
)


def live_history(*, session: Session, user_id: str) -> list[tuple[str, float]]:
    """The user's live interactions as (item_id, rating), ordered by (timestamp, item_id)."""
    rows = session.execute(
        select(Interaction.item_id, Interaction.rating)
        .where(Interaction.user_id == user_id, Interaction.deleted_at.is_(None))
        .order_by(Interaction.timestamp, Interaction.item_id)
    ).all()
    if not rows:
        raise UserNotFound(f"user {user_id!r} is unknown or has no live interactions")
    return [(str(i), float(r)) for i, r in rows]


def titles(*, session: Session, item_ids: Sequence[str]) -> dict[str, str]:
    """Titles of the given items; the result lacks the unknown ones."""
    found: dict[str, str] = {}
    for chunk in chunks(list(item_ids)):
        rows = session.execute(select(Item.item_id, Item.title).where(Item.item_id.in_(chunk)))
        found.update((str(i), str(t)) for i, t in rows)
    return found


def popular_items(*, session: Session, exclude: set[str], limit: int) -> list[str]:
    """The ``limit`` items with the most live interactions, leaving out ``exclude``."""
    count = func.count(Interaction.id)
    rows = session.execute(
        select(Interaction.item_id, count).where(Interaction.deleted_at.is_(None))
        .group_by(Interaction.item_id).order_by(count.desc(), Interaction.item_id).limit(limit + len(exclude))
    ).all()
    return [str(i) for i, _ in rows if i not in exclude][:limit]


def popularity(*, session: Session, item_ids: Sequence[str]) -> dict[str, int]:
    rows = session.execute(
        select(Interaction.item_id, func.count(Interaction.id))
        .where(Interaction.deleted_at.is_(None), Interaction.item_id.in_(list(item_ids)))
        .group_by(Interaction.item_id)
    ).all()
    return {str(i): int(n) for i, n in rows}


@dataclass(frozen=True)
class ShardView:
    shard: int
    state: str
    version: int | None
    path: Path | None
    n_samples: int | None
    trained_at: datetime | None
    manifest_sha256: str | None
    dirty: bool


def shard_views(*, session: Session) -> list[ShardView]:
    out = []
    for shard in session.scalars(select(Shard).order_by(Shard.shard)):
        version = version_row(session=session, shard=shard.shard, version=shard.serving_version)
        out.append(ShardView(
            shard=shard.shard, state=shard.state, version=shard.serving_version,
            path=Path(version.path) if version else None, n_samples=version.n_samples if version else None,
            trained_at=as_utc(version.created_at) if version else None,
            manifest_sha256=version.manifest_sha256 if version else None, dirty=shard.dirty,
        ))
    return out


def kept_versions(*, session: Session) -> dict[int, set[int]]:
    """Per shard, the version numbers whose folders belong on disk: every recorded version not purged."""
    kept: dict[int, set[int]] = {}
    for shard, version in session.execute(select(AdapterVersion.shard, AdapterVersion.version)
                                          .where(AdapterVersion.purged_at.is_(None))):
        kept.setdefault(shard, set()).add(version)
    return kept


def live_sample_ids(*, session: Session, split: str, shard: int | None = None) -> list[str]:
    query = select(Sample.sample_id).where(Sample.split == split, Sample.deleted_at.is_(None))
    if shard is not None:
        query = query.where(Sample.shard == shard)
    return sorted(session.scalars(query))


def deletion_counts(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(DeletionRequest.status, func.count()).group_by(DeletionRequest.status)).all()
    return {str(status): int(n) for status, n in rows}
