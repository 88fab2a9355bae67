"""After a user whose new ratings were learned online is forgotten through the real path (gateway, Redis
queue, worker placement, retrains and purge), a
forensic read of everything the service keeps finds nothing that names them or gives their data back:
the ledger (every table, every column), the run folder (every file: JSON, Parquet, NumPy, safetensors
metadata, and every file name), Redis (every key and value of the test's) and the logs. Searched: the
user's id, their interaction keys and ids, their samples' ids and hashes (sha256 of each prompt and
history prompt, as the embedding cache names them, and of each sample's content), and the plain hashes
of the versions that trained on them. SQLite and PostgreSQL; on SQLite the database file and its log are
read byte for byte too."""

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from rq import SimpleWorker
from sqlalchemy import select

from apa import artifacts
from apa.hashing import sha256_json, sha256_text
from apa.replay import all_versions, verify_version
from apa.runs import read_run
from jobs import queue
from ledger import backlog, db
from ledger.db import session_scope
from ledger.models import Interaction
from tests.conftest import gateway_with_worker, load_tiny, service_settings
from tests.service.test_flow import AUTH, user_with_train_samples
from tests.support.forensics import (
    Place,
    file_places,
    findings,
    ledger_places,
    log_places,
    redis_places,
    sqlite_files,
    token,
)
from worker.record import extra_samples

T = 900_000_000  # 1998: ingested ratings, later than every hand-made one


@pytest.fixture
def env(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> Iterator[dict]:
    """Ingested samples train at once (one pending sample makes a retrain due), half join validation."""
    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, ingest_min_samples=1,
                                ingest_valid_fraction=0.5)
    with gateway_with_worker(settings, tiny_model_dir) as env:
        yield env


def work(env: dict) -> None:
    """Every queued job, deletions' first (as `apa worker` does)."""
    SimpleWorker(queue.queues(env["redis"], env["settings"].redis_prefix), connection=env["redis"]).work(burst=True)


def _terms(env: dict, user: str) -> dict[str, re.Pattern[str]]:
    """What names the user or gives their data back, read before the deletion: from the ledger, the run
    folder and every version on disk that trained or chose its epoch on one of their samples."""
    run_dir = env["run_dir"]
    with session_scope(env["settings"].ledger_url) as session:
        interactions = session.execute(select(Interaction.key, Interaction.id)
                                       .where(Interaction.user_id == user)).all()
        ingested = [r for r in backlog.records(session=session) if r.user_id == user]
    run = read_run(run_dir).with_samples(extra_samples(ingested))
    samples = [s for split in run.splits.values() for s in split if s.user_id == user]
    assert ingested and {r.sample_id for r in ingested} <= {s.sample_id for s in samples}
    terms = {f"user id {user!r}": token(user)}
    terms |= {f"interaction key {k}": token(k) for k, _ in interactions}
    terms |= {f"interaction id {i}": token(str(i)) for _, i in interactions}
    terms |= {f"sample id {s.sample_id}": token(s.sample_id) for s in samples}
    for s in samples:
        for what, digest in (("prompt", sha256_text(run.prompts[s.sample_id])),
                             ("history prompt", sha256_text(run.history_prompts[s.sample_id])),
                             ("content", sha256_json(s.content()))):
            terms[f"sha256 of {s.sample_id}'s {what}"] = re.compile(digest)
    ids = {s.sample_id for s in samples}
    for adapter, version in all_versions(run_dir):
        manifest = artifacts.read_json(artifacts.version_dir(run_dir, adapter, version) / "manifest.json")
        if ids & ({s["sample_id"] for s in manifest["samples"]} | artifacts.selection_ids(manifest)):
            terms[f"manifest_sha256 of {adapter} v{version}"] = re.compile(manifest["manifest_sha256"])
            terms[f"adapter_sha256 of {adapter} v{version}"] = re.compile(manifest["adapter_sha256"])
    return terms


def _everything(env: dict, records: list[logging.LogRecord]) -> list:
    settings = env["settings"]
    return [*ledger_places(db.get_engine(settings.ledger_url)), *file_places(env["run_dir"]),
            *redis_places(env["redis"], settings.redis_prefix), *log_places(records)]


def _raw_sqlite(env: dict, terms: dict[str, re.Pattern[str]]) -> list[str]:
    """A SQLite ledger's file and log, byte for byte: a free page or an old log frame may hold a purged row
    (``ledger.db``: secure_delete, and a checkpoint after each purge). Terms of a few characters, or stored
    as binary integers, would match random bytes: keys, sample ids and hashes only."""
    long_terms = {what: pattern for what, pattern in terms.items()
                  if what.startswith(("interaction key", "sample id", "sha256"))}
    files = sqlite_files(env["settings"].ledger_url)
    return findings((Place(f"raw {p.name}", p.read_bytes().decode("latin-1")) for p in files), long_terms)


def test_nothing_kept_names_a_forgotten_user_or_gives_their_data_back(
    env: dict, caplog: pytest.LogCaptureFixture, tiny_model_dir: Path,
) -> None:
    caplog.set_level(logging.INFO)
    client, run_dir = env["client"], env["run_dir"]
    user, _ = user_with_train_samples(run_dir)
    learned = client.post(f"/users/{user}/interactions", headers=AUTH, json={"interactions": [
        {"item_id": item, "rating": rating, "timestamp": T + i} for i, (item, rating) in enumerate(
            [("6", 5), ("7", 1), ("8", 4)])]})
    assert learned.status_code == 202, learned.text
    work(env)  # placed, in the validation memory, trained into new versions
    assert client.post("/recommend", json={"user_id": user, "candidates": ["1", "2"]}).status_code == 200
    terms = _terms(env, user)
    assert any(what.startswith("manifest_sha256 of ") and what.endswith(" v2") for what in terms), \
        "a version trained on the ingested ratings"
    before = set(findings(_everything(env, caplog.records), terms))
    for kind in ("user id", "interaction key", "interaction id", "sample id", "sha256 of", "manifest_sha256",
                 "adapter_sha256"):  # the search sees each kind of trace while the data is there
        assert any(f.startswith(kind) for f in before), f"no {kind} found before the deletion"
    if env["settings"].ledger_url.startswith("sqlite"):
        assert _raw_sqlite(env, terms), "the raw read sees the rows while they are there"

    deleted = client.delete(f"/users/{user}/interactions", headers=AUTH)
    assert deleted.status_code == 202, deleted.text
    work(env)  # retrain, publish, complete with the certificate, purge
    request = client.get(f"/deletions/{deleted.json()['request_id']}").json()
    assert request["status"] == "completed" and request["certificate"]["centres_recomputed"] is True

    left = findings(_everything(env, caplog.records), terms)
    assert not left, "\n".join(left)
    raw = _raw_sqlite(env, terms)
    assert not raw, "\n".join(raw)
    # and what remains still replays: every version left on disk (`apa verify --all`), none selected on a
    # purged validation sample
    base = load_tiny(tiny_model_dir)
    left_versions = all_versions(run_dir)
    assert left_versions and all(verify_version(run_dir, base, a, v).equal for a, v in left_versions)
