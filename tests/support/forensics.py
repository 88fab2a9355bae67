"""Forensic reads for the forgetting tests: everything a ledger, a run folder, Redis and the logs hold, as
text to search for what a deletion removed.

Binary payloads (tensors, embeddings) are read for their metadata and strings only: a two-character user
id turns up by chance in a few kilobytes of random float bytes.
"""

import contextlib
import io
import json
import logging
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from redis import Redis
from sqlalchemy import MetaData, select
from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class Place:
    where: str  # "ledger table.column", "file <path>", "redis <key>", "log <logger>"
    text: str


def ledger_places(engine: Engine) -> Iterator[Place]:
    """Every value of every row of every table (reflected: tables no model names are read too)."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(select(table)):
                for column, value in row._mapping.items():
                    text = value.decode("latin-1") if isinstance(value, bytes) else json.dumps(value, default=str)
                    yield Place(f"ledger {table.name}.{column}", text)


def sqlite_files(url: str) -> list[Path]:
    """A SQLite ledger's database file and its write-ahead log and shared memory; none for other databases."""
    if not url.startswith("sqlite"):
        return []
    path = Path(url.split("///", 1)[1])
    return sorted(path.parent.glob(f"{path.name}*"))


def _safetensors_header(data: bytes) -> str:
    (length,) = struct.unpack("<Q", data[:8])
    return data[8:8 + length].decode("utf-8")


def _strings(arrays: Iterable[np.ndarray]) -> str:
    return "\n".join(str(x) for a in arrays if a.dtype.kind in "USO" for x in a.ravel())


def file_places(root: Path) -> Iterator[Place]:
    """Every file under ``root``: its path, and its content as text (Parquet as rows, NumPy files as their
    string arrays, safetensors as their header and metadata, anything else as UTF-8 when it is)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        yield Place(f"path {name}", name)
        data = path.read_bytes()
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).to_csv()
        elif path.suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                text = _strings(stored[n] for n in stored.files)
        elif path.suffix == ".npy":
            text = _strings([np.load(io.BytesIO(data), allow_pickle=False)])
        elif path.suffix == ".safetensors":
            text = _safetensors_header(data)
        else:
            text = data.decode("utf-8")  # raises on a binary format this reader does not know yet
        yield Place(f"file {name}", text)


def _redis_text(value: bytes) -> str:
    with contextlib.suppress(zlib.error):
        value = zlib.decompress(value)  # RQ keeps job data zlib-compressed pickles
    return value.decode("latin-1")


def _ours(redis: Redis, key: str, prefix: str) -> bool:
    """A key named with the test's prefix, or an RQ key of a job on one of its queues."""
    if prefix in key:
        return True
    if not key.startswith("rq:"):
        return False
    job = f"rq:job:{key.rsplit(':', 1)[-1]}"
    return redis.type(job) == b"hash" and prefix in _redis_text(redis.hget(job, "origin") or b"")


def redis_places(redis: Redis, prefix: str) -> Iterator[Place]:
    """Every key of this test's (see ``_ours``) and every value in it, by its type."""
    for raw in sorted(redis.scan_iter("*")):
        key = raw.decode()
        if not _ours(redis, key, prefix):
            continue
        kind = redis.type(raw).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [redis.get(raw) or b""]
        elif kind == "hash":
            values = [v for pair in redis.hgetall(raw).items() for v in pair]
        elif kind == "list":
            values = redis.lrange(raw, 0, -1)
        elif kind == "set":
            values = list(redis.smembers(raw))
        elif kind == "zset":
            values = [m for m, _ in redis.zrange(raw, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [v for _, fields in redis.xrange(raw) for pair in fields.items() for v in pair]
        yield Place(f"redis {key}", "\n".join([key, *(_redis_text(v) for v in values)]))


def log_places(records: Iterable[logging.LogRecord], *, skip: tuple[str, ...] = ("httpx",)) -> Iterator[Place]:
    """What the processes logged (``skip``: the test client's own loggers, not the service's)."""
    for record in records:
        if record.name.startswith(skip):
            continue
        yield Place(f"log {record.name}", "\n".join([record.getMessage(), record.exc_text or ""]))


def token(value: str) -> re.Pattern[str]:
    """``value`` standing alone (a user id ``u2`` is not in ``u23`` nor inside a word)."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])")


def findings(places: Iterable[Place], terms: dict[str, re.Pattern[str]]) -> list[str]:
    """``"<what> in <where>"`` for each term found in each place."""
    return [f"{what} in {place.where}" for place in places for what, pattern in terms.items()
            if pattern.search(place.text)]
