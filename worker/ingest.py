"""The worker's part of online learning: placing a semantic run's new training samples, bringing new
validation samples into the validation memory, waking the due retrains, and handing a retrain the
ingested samples the run folder does not hold.

``prepare_ingested()`` (a job on the ingestion queue, safe to run twice):

1. a semantic run's unplaced training samples are embedded with the base model (the partition's
   embedding, cached in the run) and given to the nearest centre (``apa.partition.assign``), each
   centre being the unit mean of its shard's live members' embeddings (``worker.centres``), recomputed
   from the ledger's live members every time (so a deletion moves it too) and stored in the ledger with
   the assignment;
2. every live validation sample missing from the validation memory is embedded into it, and every
   serving version's ``valid_predictions.json`` gains its p(yes) for each live validation sample it
   lacks (the version's own adapter, one-hot in the torch engine's stack: PEFT's numbers within 1e-5,
   without a copy of the model per version). The
   gateway's attention uses a sample only once the memory and every serving version hold it;
3. the shards whose pending samples are due get a retrain on the ingestion queue.

Steps 1 and 2 hold the run folder's ``purge`` lock: the purge rewrites the same files. The job is
enqueued after an ingestion that needs it, after every published version while ingested samples
exist, and by each reconcile round while live ingested samples are in the ledger.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np

from apa import artifacts
from apa.embeddings import embed, normalise_rows
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.faults import crash_point
from apa.partition import Incoming, assign
from apa.runs import embedding_cache, memory_path, read_run
from jobs import queue
from ledger import backlog, catalog, ingest, run_import
from ledger.db import session_scope
from worker.centres import live_centres, unit_embeddings
from worker.record import extra_samples
from worker.tasks import WorkerContext, get_context, held_lock

log = logging.getLogger(__name__)


def prepare_ingested() -> dict[str, Any]:
    ctx = get_context()
    settings = ctx.settings
    queue.clear_prepare(ctx.redis, settings.redis_prefix)
    with held_lock(ctx.redis, queue.Names(settings.redis_prefix).lock("purge"), settings.lock_ttl_s,
                   ctx.name) as held:
        if not held:  # a purge rewrites the same files; the reconciler enqueues this job again
            return {"status": "busy"}
        placed = place_samples(ctx)
        memory = fill_validation(ctx)
    enqueued = enqueue_due(ctx)
    result = {"status": "ok", "placed": placed, **memory, "enqueued": enqueued}
    if placed or memory["memory_added"] or memory["predictions_added"]:
        queue.publish(ctx.redis, settings.redis_prefix, {"type": "memory"})
        log.info("prepared ingested samples: %s", result)
    return result


def enqueue_due(ctx: WorkerContext) -> list[int]:
    """Enqueue the retrains whose pending samples are due (count or age), on the ingestion queue."""
    settings = ctx.settings
    with session_scope(settings.ledger_url) as session:
        due = backlog.due_shards(session=session, min_samples=settings.ingest_min_samples,
                                max_delay_s=settings.ingest_max_delay_s)
    return [k for k in due if queue.enqueue_retrain(ctx.redis, settings, k, queue.INGESTION)]


def place_samples(ctx: WorkerContext) -> int:
    settings, base = ctx.settings, ctx.base
    with session_scope(settings.ledger_url) as session:
        waiting = [r for r in backlog.records(session=session, unprepared=True) if r.split == "train"]
        if not waiting:
            return 0
        sizes = np.array(ingest.shard_sizes(session=session, shards=run_import.get_run(session=session).shards))
    live = live_centres(base, settings.ledger_url)
    if live is None:
        raise ValueError(f"{len(waiting)} training sample(s) wait for a shard but the run is not semantic")
    cfg = live.run.config
    new_unit = unit_embeddings(base, live.run_dir, live.run, [r.prompt for r in waiting], "embed new samples")
    shards = assign(cfg.partition, Incoming(sample_ids=[r.sample_id for r in waiting],
                                            user_ids=[r.user_id for r in waiting], sizes=sizes, seed=cfg.seed,
                                            unit=new_unit, centres=live.centres, balance=settings.ingest_balance))
    with session_scope(settings.ledger_url) as session:
        return backlog.place(session=session, centres=live.centres.tolist(),
                            shards={r.sample_id: int(k) for r, k in zip(waiting, shards, strict=True)})


def fill_validation(ctx: WorkerContext) -> dict[str, int]:
    """New validation samples into the memory; every serving version's predictions on every live one."""
    settings, base = ctx.settings, ctx.base
    with session_scope(settings.ledger_url) as session:
        run_dir = Path(run_import.get_run(session=session).path)
        live_valid = catalog.live_sample_ids(session=session, split="valid")
        records = {r.sample_id: r for r in backlog.records(session=session, sample_ids=live_valid)}
        views = [v for v in catalog.shard_views(session=session) if v.path is not None]
    if not live_valid:
        return {"memory_added": 0, "predictions_added": 0}
    run = read_run(run_dir).with_samples(extra_samples(list(records.values())))
    cfg = run.config
    path = memory_path(run_dir)
    with np.load(path) as data:
        stored = {name: data[name] for name in data.files}
    in_memory = {str(s) for s in stored["sample_ids"]}
    missing = [s for s in live_valid if s not in in_memory and s in records]  # the run's are there since it began
    if missing:
        cache = embedding_cache(run_dir, base)
        full = normalise_rows(embed(base, [run.prompts[s] for s in missing], cache=cache, batch_size=cfg.batch_size,
                                    noun=cfg.noun))
        hist = normalise_rows(embed(base, [run.history_prompts[s] for s in missing], cache=cache,
                                    batch_size=cfg.batch_size, noun=cfg.noun))
        labels = np.array([int(records[s].content["label"]) for s in missing], dtype=stored["labels"].dtype)
        stored = {"sample_ids": np.concatenate([stored["sample_ids"].astype(str), np.array(missing)]),
                  "embeddings": np.concatenate([stored["embeddings"], full.astype(stored["embeddings"].dtype)]),
                  "history_embeddings": np.concatenate([stored["history_embeddings"],
                                                        hist.astype(stored["history_embeddings"].dtype)]),
                  "labels": np.concatenate([stored["labels"], labels])}
        _save_npz(path, stored)
        crash_point("ingest.memory-written")
    files = {v.shard: v.path / "valid_predictions.json" for v in views if v.path is not None}
    stored_predictions = {k: artifacts.read_json(f) if f.is_file() else {} for k, f in files.items()}
    lacking = {k: [s for s in live_valid if s not in p and s in run.prompts] for k, p in stored_predictions.items()}
    added = 0
    if any(lacking.values()):
        # the serving versions stacked in one engine (the gateway's own scoring path: no copy of the model);
        # a one-hot weight row gives each shard's own p(yes), equal to PEFT's within 1e-5
        engine = TorchEngine(base)
        engine.load([AdapterRef(shard=v.shard, version=v.version or 0, path=v.path) for v in views
                     if v.path is not None])
        for shard, todo in lacking.items():
            if not todo:
                continue
            scores = engine.score_shared([run.prompts[s] for s in todo], np.eye(len(views))[shard],
                                         batch_size=cfg.batch_size)
            artifacts.write_json_atomic(files[shard], {**stored_predictions[shard],
                                                       **{s: float(p) for s, p in zip(todo, scores, strict=True)}})
            added += len(todo)
    with session_scope(settings.ledger_url) as session:
        backlog.mark_prepared(session=session, sample_ids=[s for s in live_valid if s in records])
    return {"memory_added": len(missing), "predictions_added": added}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    artifacts.replace_atomically(path, lambda tmp: np.savez(tmp, **arrays))  # type: ignore[arg-type]
