"""A semantic run's centres as the worker keeps them: each shard's centre is the unit mean of its live
members' embeddings (``apa.partition.member_centres``; the partition's embedding, cached in the run).

Placing ingested samples uses them (``worker.ingest``). A deletion's purge recomputes them and stores
them in ``run.json`` and in the ledger (``worker.tasks.purge_completed``): the K-means fit, and any centre
computed before, saw the deleted samples, and subtracting the remaining members from such a centre
rebuilds a deleted sample's embedding. Assignments never change.

The gateway reads no centres (its attention weighs shards by the validation memory and the serving
versions' predictions), so nothing needs to reach it; the worker reads ``run.json`` afresh in every job.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apa.embeddings import embed, normalise_rows
from apa.model import BaseModel
from apa.partition import member_centres
from apa.runs import RunData, embedding_cache, read_run, write_centres
from ledger import backlog, run_import
from ledger.db import session_scope


@dataclass(frozen=True)
class LiveCentres:
    run_dir: Path
    run: RunData
    centres: np.ndarray  # [K, hidden] unit centres of the live members
    members: int  # the live training samples they are the mean of


def unit_embeddings(base: BaseModel, run_dir: Path, run: RunData, prompts: list[str], desc: str) -> np.ndarray:
    """The partition's embedding of ``prompts``, unit rows: [n, hidden] (cached in the run)."""
    if not prompts:
        return np.zeros((0, base.model.config.hidden_size), dtype=np.float32)
    return normalise_rows(embed(base, prompts, cache=embedding_cache(run_dir, base),
                                batch_size=run.config.batch_size, desc=desc, noun=run.config.noun))


def live_centres(base: BaseModel, ledger_url: str) -> LiveCentres | None:
    """The centres of the ledger's live training samples (run's and ingested); None for a run that has none
    (random or user partition)."""
    with session_scope(ledger_url) as session:
        run_dir = Path(run_import.get_run(session=session).path)
        members = backlog.train_members(session=session)
        ingested = {r.sample_id: r for r in backlog.records(session=session, sample_ids=[i for i, _ in members])}
    run = read_run(run_dir)
    if run.centres is None:
        return None
    prompts = [ingested[i].prompt if i in ingested else run.prompts[i] for i, _ in members]
    unit = unit_embeddings(base, run_dir, run, prompts, "embed shard members")
    centres = member_centres(unit, np.array([k for _, k in members]), run.config.shards, run.centres)
    return LiveCentres(run_dir=run_dir, run=run, centres=centres, members=len(members))


def recompute(base: BaseModel, ledger_url: str) -> int | None:
    """Store the live members' centres in ``run.json`` and the ledger; returns how many members they are the
    mean of (None: the run has no centres). Call it holding the run folder's ``purge`` lock."""
    live = live_centres(base, ledger_url)
    if live is None:
        return None
    write_centres(live.run_dir, live.centres)
    with session_scope(ledger_url) as session:
        backlog.store_centres(session=session, centres=live.centres.tolist())
    return live.members
