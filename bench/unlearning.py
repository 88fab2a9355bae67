"""What forgetting costs: retraining one shard from scratch vs retraining one adapter on all data.

* training alone, per K: ``train_adapter`` on ceil(N/K) training samples vs on all N (the same fixed
  number of epochs — the run's ``max_epochs`` unless ``--epochs`` — batch and hardware, no per-epoch
  validation; N = the run's training split);
* the whole job, for the run's own K: ``worker.tasks.retrain_shard`` end to end after a real deletion
  (snapshot, train, validation predictions and gate, publish, purge) on a copy of the run with its
  own SQLite ledger and Redis prefix.

Target: one-shard training ≤ 1.2 / K × full retraining.

    python bench/unlearning.py --run var/runs/small --ks 2,4,8 --out docs/results/unlearning.json
    python bench/unlearning.py --quick      # trains its own K=2, 64/32/64, 1-epoch run first
"""

import argparse
import math
import secrets
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from apa import training
from apa.model import load_base_model
from apa.runs import read_run
from apa.settings import get_settings
from bench import quick
from bench.machine import command_line, describe, write_report
from bench.stack import served_copy
from ledger import db, deletions
from worker.record import import_run


def time_training(base: Any, prompts: list[str], labels: list[int], cfg: training.TrainConfig) -> float:
    started = time.perf_counter()
    training.train_adapter(base, prompts, labels, cfg, seed=0, desc=f"train {len(prompts)} samples")
    return time.perf_counter() - started


def whole_job(run_src: Path, base: Any, work: Path) -> dict[str, Any]:
    from jobs import queue
    from worker.settings import WorkerSettings
    from worker.tasks import WorkerContext, retrain_shard, set_context

    run = served_copy(run_src, work / "job-run")
    core = get_settings()
    settings = WorkerSettings(home=core.home, database_url=f"sqlite:///{work / 'ledger.db'}",
                              hmac_key=SecretStr(secrets.token_hex(16)), base_model_path=core.base_model_path,
                              redis_prefix=f"apa-bench-{secrets.token_hex(4)}:")
    db.upgrade(settings.ledger_url)
    with db.session_scope(settings.ledger_url) as session:
        import_run(session, run, settings)
    data = read_run(run)
    shard = 0
    user = next(s.user_id for s in data.shard_samples(shard))
    with db.session_scope(settings.ledger_url) as session:
        request = deletions.request_deletion(session=session, user_id=user, item_ids=None,
                                             key=settings.hmac_secret()).request
        affected = list(request.affected_shards)
    redis = queue.connect(settings.redis_url)
    set_context(WorkerContext(settings=settings, base=base, redis=redis))
    try:
        started = time.perf_counter()
        result = retrain_shard(shard)
        seconds = time.perf_counter() - started
    finally:
        set_context(None)
        for key in redis.scan_iter(f"{settings.redis_prefix}*"):
            redis.delete(key)
        redis.close()
    return {"shard": shard, "affected_shards": affected, "seconds": round(seconds, 2),
            "samples": result.get("samples"), "status": result["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained run folder (not modified)")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--epochs", type=int, help="default: the run's max_epochs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apa-unlearning-"))
    if args.quick:
        args.run, args.ks = quick.train_quick_run(work / "quick"), str(quick.SHARDS)
    if args.run is None:
        parser.error("--run is required without --quick")
    run = read_run(args.run)
    cfg = replace(run.config.train, patience=None, max_epochs=args.epochs or run.config.train.max_epochs)
    base = load_base_model(get_settings().base_model_dir)
    train = run.splits["train"]
    prompts, labels = [run.prompts[s.sample_id] for s in train], [s.label for s in train]
    full_s = time_training(base, prompts, labels, cfg)
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        n = math.ceil(len(train) / k)
        shard_s = time_training(base, prompts[:n], labels[:n], cfg)
        rows.append({"k": k, "shard_samples": n, "shard_train_s": round(shard_s, 2), "full_train_s": round(full_s, 2),
                     "shard_over_full": round(shard_s / full_s, 4), "target": round(1.2 / k, 4),
                     "met": shard_s / full_s <= 1.2 / k})
        print(f"K={k}: one shard ({n} samples) {shard_s:.1f} s vs all {len(train)} samples {full_s:.1f} s "
              f"-> {shard_s / full_s:.3f} (target <= {1.2 / k:.3f})", flush=True)
    job = whole_job(args.run, base, work)
    job["k"] = run.config.shards
    print(f"whole retrain job, K={run.config.shards}, shard {job['shard']} ({job['samples']} samples): "
          f"{job['seconds']:.1f} s ({job['status']})")
    report = {"benchmark": "unlearning", "machine": describe(), "epochs": cfg.max_epochs, "n_train": len(train),
              "command": command_line("bench/unlearning.py"), "training": rows, "whole_job": job}
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
