"""A deletion's purge recomputes the semantic centres from the live members (worker.centres), on the tiny
run through the real path (gateway, in-process worker, SQLite and PostgreSQL)."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apa import artifacts
from apa.embeddings import embed, normalise_rows
from apa.partition import member_centres
from apa.runs import read_run
from ledger.db import session_scope
from ledger.models import Shard
from tests.conftest import gateway_with_worker, load_tiny, service_settings
from tests.service.test_flow import AUTH, run_worker, user_with_train_samples


@pytest.fixture
def env(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> Iterator[dict]:
    with gateway_with_worker(service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir),
                             tiny_model_dir) as env:
        yield env


def test_a_deletion_recomputes_the_centres_from_the_live_members_and_says_so(
    env: dict, tiny_model_dir: Path,
) -> None:
    """The K-means centres were fitted with the deleted samples: subtracting the remaining members would
    rebuild their embeddings. After the purge each centre is the unit mean of its live members'
    embeddings; the assignments stay; the certificate says so."""
    client, run_dir = env["client"], env["run_dir"]
    before = read_run(run_dir)
    assert before.centres is not None
    user, _ = user_with_train_samples(run_dir)
    request_id = client.delete(f"/users/{user}/interactions", headers=AUTH).json()["request_id"]
    run_worker(env)

    certificate = client.get(f"/deletions/{request_id}").json()["certificate"]
    after = read_run(run_dir)
    live = [s.sample_id for s in after.splits["train"]]
    assert live and not any(s.startswith(f"{user}:") for s in live)
    assert {s: after.shard_of[s] for s in live} == {s: before.shard_of[s] for s in live}, "assignments stay"
    unit = normalise_rows(embed(load_tiny(tiny_model_dir), [after.prompts[s] for s in live]))
    expected = member_centres(unit, np.array([after.shard_of[s] for s in live]), 2, before.centres)
    assert after.centres is not None and not np.allclose(after.centres, before.centres, atol=1e-4)
    np.testing.assert_allclose(after.centres, expected, atol=1e-5)
    assert artifacts.read_json(run_dir / "run.json")["samples"], "run.json is whole (written atomically)"
    with session_scope(env["settings"].ledger_url) as session:
        stored = [shard.centre for shard in session.query(Shard).order_by(Shard.shard)]
    np.testing.assert_allclose(np.array(stored), expected, atol=1e-5)
    assert (certificate["centres_recomputed"], certificate["centre_members"]) == (True, len(live))
