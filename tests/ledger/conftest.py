"""The ledger's subject tests share the tiny run (tests/conftest.py), recorded in an empty ledger.

The tiny run's layout (seed 0) is below; ``test_run_import`` checks that the ledger holds exactly it.
A sample's id is its target interaction's key (``user:item:timestamp``), and a sample contains its
user's interactions up to and including its target, in (timestamp, item_id) order: so deleting a
user's last rating removes one sample, deleting their first removes all of theirs.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ledger import db
from ledger.run_import import VersionRecord
from service.settings import ServiceSettings
from tests.conftest import record_run, service_settings

SHARD_SAMPLES = {
    0: ["u1:5:500", "u2:1:170", "u2:2:180", "u4:11:370"],
    1: ["u1:2:300", "u2:8:130", "u4:1:320", "u4:2:380"],
}
VALID_SAMPLES = ["u1:3:400", "u1:4:200", "u2:11:150", "u3:5:220", "u3:9:260", "u4:3:330", "u4:5:340", "u4:9:360"]
TEST_SAMPLES = ["u2:12:160", "u2:7:120", "u2:9:140", "u3:10:270", "u3:11:280", "u3:6:230", "u3:7:240", "u4:7:350"]


@pytest.fixture
def settings(ledger_url: str, service_home: Path, redis_prefix: str, tiny_model_dir: Path) -> ServiceSettings:
    """The tiny run recorded in a freshly migrated ledger (SQLite or PostgreSQL)."""
    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir)
    record_run(settings)
    return settings


@pytest.fixture
def key(settings: ServiceSettings) -> bytes:
    return settings.hmac_secret()


@pytest.fixture
def session(settings: ServiceSettings) -> Iterator[Session]:
    """One transaction on the recorded ledger, rolled back afterwards."""
    with db.session_factory(settings.ledger_url)() as session:
        yield session
        session.rollback()


def fake_version(folder: Path, *, shard: int, version: int, samples: list[list[str]]) -> VersionRecord:
    """A retrained version's folder holding only its manifest: one entry of interaction keys per sample."""
    folder.mkdir(parents=True)
    sha = (f"{shard}{version}" * 32)[:64]  # 64 hex digits naming it: shard 0 v2 is "0202..."
    doc = {"shard": shard, "version": version, "n_samples": len(samples), "manifest_sha256": sha,
           "samples": [{"interaction_keys": keys} for keys in samples]}
    (folder / "manifest.json").write_text(json.dumps(doc))
    return VersionRecord(shard=shard, version=version, path=folder, manifest_sha256=sha, n_samples=len(samples),
                         metrics={"valid_auc": 0.5})
