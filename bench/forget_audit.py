"""Is deleted data really gone? A membership-inference audit of a deletion through the running service.

Starts its own gateway and worker on a *copy* of the given run (fresh SQLite ledger, own Redis prefix),
picks ``--users`` users whose training samples all sit in one shard (most samples first), and measures a
loss-based membership-inference attack: each sample's loss under the served model (cross-entropy of its
label under the APA mixture with the service's per-user weights, attention chosen on validation), and
the attack's AUC telling the deleted users' *training* samples (members until the deletion) from
never-seen test samples (lower loss = member), with a 95% stratified bootstrap interval. Measured:

* ``before``: the served model before the deletion (the deleted samples are members);
* ``quarantine_only``: the same adapters with the affected shard left out, as the gateway serves from
  the 202 until the retrain is live;
* ``after``: the served model once the deletion completed (the shard retrained from scratch);
* references: never-seen against never-seen (two halves of the test samples: 0.5 by construction) and
  kept training samples against never-seen (members throughout);
* ``own_test_before`` / ``own_test_after``: the deleted training samples against the same users' own test
  samples (never trained), where there are any: outsiders from the same population.

Then ``apa verify`` replays every new version from its manifest (same bytes = the from-scratch retrain
without the data, exactly), and no serving manifest may name a deleted sample.

    python bench/forget_audit.py --run var/runs/demo --out docs/results/forget-audit.json   (+ .png beside it)
    python bench/forget_audit.py --quick          # trains its own K=2, 64/32/64, 1-epoch run first
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apa import aggregation, artifacts
from apa.embeddings import embed
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.evaluation import load_memory
from apa.metrics import auc, bootstrap_ci
from apa.model import BaseModel, load_base_model
from apa.replay import verify_version
from apa.runs import embedding_cache
from apa.settings import get_settings
from bench.client import Client
from bench.forget import wait_status
from bench.machine import command_line, describe, write_report
from bench.plots import forget_audit as plot_audit
from bench.quick import train_quick_run
from bench.stack import gateway_and_worker, served_copy, service_env


def pick_users(frame: pd.DataFrame, n: int) -> tuple[int, list[str]]:
    """The shard with the most single-shard users, and its ``n`` users with the most training samples."""
    train = frame[frame["split"] == "train"]
    shards = train.groupby("user_id")["shard"].nunique()
    alone = train[train["user_id"].isin(shards[shards == 1].index)]
    shard = int(alone.groupby("shard")["user_id"].nunique().idxmax())
    counts = alone[alone["shard"] == shard].groupby("user_id").size().sort_values(ascending=False, kind="stable")
    return shard, [str(u) for u in counts.index[:n]]


def audit_sets(frame: pd.DataFrame, users: list[str]) -> dict[str, pd.DataFrame]:
    """The samples the audit scores: ``deleted`` (the users' training samples), ``never`` (everyone else's
    test samples), ``kept`` (as many of everyone else's training samples) and ``own_test`` (the deleted
    users' own test samples: never trained, and from the deleted samples' population, so an attack against
    them shows membership without the gap between heavy users of one cluster and random test samples)."""
    mine = frame["user_id"].astype(str).isin(users)
    train, test = frame["split"] == "train", frame["split"] == "test"
    never, others = frame[test & ~mine], frame[train & ~mine]
    return {"deleted": frame[train & mine], "never": never,
            "kept": others.sample(n=min(len(never), len(others)), random_state=0), "own_test": frame[test & mine]}


def losses(base: BaseModel, run: Path, refs: list[AdapterRef], rows: pd.DataFrame,
           active: set[int] | None = None) -> np.ndarray:
    """Each row's cross-entropy under the served mixture (per-user weights, the attention the run's
    validation memory chooses), with only ``active`` shards (default all)."""
    memory = load_memory(run, refs)
    choice = aggregation.choose_attention(memory, mode="per-user")
    queries = embed(base, rows["history_prompt"].tolist(), cache=embedding_cache(run, base))
    mask = None if active is None else [k in active for k in range(len(refs))]
    w = aggregation.weights(memory, queries, mode="per-user", attention=choice.attention, active=mask)  # [n, K]
    engine = TorchEngine(base)
    engine.load(refs)
    p = np.clip(engine.score(rows["prompt"].tolist(), w), 1e-7, 1 - 1e-7)  # [n]
    y = rows["label"].to_numpy()
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def attack(member: np.ndarray, outsider: np.ndarray) -> dict[str, Any]:
    """AUC of telling members (label 1) from outsiders by lower loss, with its 95% interval."""
    labels = np.r_[np.ones(len(member)), np.zeros(len(outsider))].astype(int)
    scores = -np.r_[member, outsider]
    low, high = bootstrap_ci(labels, scores)
    return {"auc": round(auc(labels, scores), 4), "ci95": [round(low, 4), round(high, 4)],
            "n_members": len(member), "n_outsiders": len(outsider)}


def serving_refs(run: Path, status: dict[str, Any]) -> list[AdapterRef]:
    return [AdapterRef(shard=s["shard"], version=s["version"],
                       path=artifacts.version_dir(run, s["shard"], s["version"]))
            for s in sorted(status["shards"], key=lambda s: s["shard"])]


def measure(client: Client, run: Path, base: BaseModel, args: argparse.Namespace) -> dict[str, Any]:
    frame = pd.read_parquet(run / "samples.parquet")  # read before the purge removes the deleted samples
    shard, users = pick_users(frame, args.users)
    sets = audit_sets(frame, users)
    deleted, never = sets["deleted"], sets["never"]
    halves = never.sample(frac=1.0, random_state=0)
    first, second = halves.iloc[: len(halves) // 2], halves.iloc[len(halves) // 2:]
    print(f"deleting {len(users)} users of shard {shard}: {len(deleted)} training samples; "
          f"{len(never)} never-seen, {len(sets['kept'])} kept training samples, "
          f"{len(sets['own_test'])} test samples of the deleted users", flush=True)

    before_refs = serving_refs(run, client.status())
    k = len(before_refs)
    before = {name: losses(base, run, before_refs, rows) for name, rows in sets.items() if len(rows)}
    quarantined = {name: losses(base, run, before_refs, rows, active=set(range(k)) - {shard})
                   for name, rows in (("deleted", deleted), ("never", never))}

    started = time.monotonic()
    requests = [client.delete_user(u) for u in users]
    finals = [wait_status(client, r["request_id"], {"completed"}, args.timeout) for r in requests]
    seconds = round(time.monotonic() - started, 1)
    status = client.status()
    after_refs = serving_refs(run, status)
    after = {name: losses(base, run, after_refs, rows) for name, rows in sets.items() if len(rows)}

    new_versions = [r for r, old in zip(after_refs, before_refs, strict=True) if r.version != old.version]
    verified = []
    for ref in new_versions:
        result = verify_version(run, base, ref.shard, ref.version)
        verified.append({"shard": ref.shard, "version": ref.version, "equal": result.equal,
                         "adapter_sha256": result.replayed_sha256, "seconds": result.seconds})
    gone = set(deleted["sample_id"])
    named = sorted(gone & {s["sample_id"] for r in after_refs
                           for s in artifacts.read_json(r.path / "manifest.json")["samples"]})
    return {
        "benchmark": "forget_audit", "shard": shard, "users": users, "n_deleted_training_samples": len(deleted),
        "statuses": [f["status"] for f in finals], "delete_to_completed_s": seconds,
        "attack": {
            "before": attack(before["deleted"], before["never"]),
            "quarantine_only": attack(quarantined["deleted"], quarantined["never"]),
            "after": attack(after["deleted"], after["never"]),
            "reference_never_vs_never": attack(losses(base, run, after_refs, first),
                                               losses(base, run, after_refs, second)),
            "reference_kept_vs_never_before": attack(before["kept"], before["never"]),
            "reference_kept_vs_never_after": attack(after["kept"], after["never"]),
            **({"own_test_before": attack(before["deleted"], before["own_test"]),
                "own_test_after": attack(after["deleted"], after["own_test"])} if "own_test" in before else {}),
        },
        "mean_loss": {phase: {name: round(float(v.mean()), 4) for name, v in values.items()}
                      for phase, values in (("before", before), ("quarantine_only", quarantined), ("after", after))},
        "new_versions_verified": verified,
        "deleted_samples_in_serving_manifests": len(named),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained run folder (copied; the copy is served)")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apa-audit-"))
    source = train_quick_run(work / "quick") if args.quick else args.run
    if source is None:
        parser.error("--run is required without --quick")
    run = served_copy(source, work / "served")
    env = service_env(f"sqlite:///{work / 'ledger.db'}")
    base = load_base_model(get_settings().base_model_dir)
    with gateway_and_worker(run, env, work, args.port):
        client = Client(f"http://127.0.0.1:{args.port}", env["APA_ADMIN_TOKEN"])
        try:
            client.wait_ready()
            report = measure(client, run, base, args)
        finally:
            client.close()
    report["machine"] = describe()
    report["command"] = command_line("bench/forget_audit.py")
    print(json.dumps(report, indent=1))
    write_report(report, args.out)
    if args.out:
        plot_audit(report, args.out.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)
    ok = all(v["equal"] for v in report["new_versions_verified"]) and not report["deleted_samples_in_serving_manifests"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
