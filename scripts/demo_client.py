"""The demo's client half: ask /recommend, teach the service a few new ratings of a user (the next
/recommend uses them, a forced retrain trains them into a new version whose manifest names them),
then forget that user, follow the deletion to `completed`, check it.

Usage: python scripts/demo_client.py --url http://127.0.0.1:8000 --run RUN_DIR  (token: APA_ADMIN_TOKEN)
Exits non-zero if any check fails. Writes a summary to RUN_DIR/demo.json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from bench.client import APIError, Client

NEW_TIMESTAMP = 900_000_000  # after MovieLens-100K's last rating


def pick_users(run_dir: Path) -> tuple[str, str]:
    """A user whose training samples sit in exactly one shard (the others keep serving), and a probe user."""
    frame = pd.read_parquet(run_dir / "samples.parquet")
    train = frame[frame["split"] == "train"]
    shards = train.groupby("user_id")["shard"].nunique()
    one = sorted(shards[shards == 1].index, key=lambda u: (len(u), u))
    target = str(one[0])
    probe = str(next(u for u in sorted(set(frame["user_id"]), key=lambda u: (len(u), u)) if u != target))
    return target, probe


def learn(client: Client, run_dir: Path, user: str, items: list[str], timeout_s: float,
          problems: list[str]) -> dict[str, object]:
    """POST three new ratings of ``user``; show the next /recommend using them; wait for the worker to place
    the new samples, force their shards' retrain, and show the new versions' manifests naming them."""
    rated = [{"item_id": item, "rating": rating, "timestamp": NEW_TIMESTAMP + n}
             for n, (item, rating) in enumerate(zip(items, (5, 2, 4), strict=False))]
    print(f"\n== POST /users/{user}/interactions {json.dumps(rated)}")
    started = time.perf_counter()
    accepted = client.ingest(user, rated)
    print(json.dumps(accepted), f"({time.perf_counter() - started:.2f} s)")
    after = client.recommend(user, top_k=20)
    offered = [i["item_id"] for i in after["items"]]
    print(f"next /recommend ({time.perf_counter() - started:.1f} s after the POST) no longer offers {items}: "
          f"{not set(items) & set(offered)}")
    if set(items) & set(offered):
        problems.append(f"/recommend still offers the items just rated: {sorted(set(items) & set(offered))}")
    new_ids = {f"{user}:{r['item_id']}:{r['timestamp']}" for r in rated}
    deadline = time.monotonic() + timeout_s
    while (status := client.status())["ingest"]["unplaced_samples"]:  # the worker embeds and places them
        if time.monotonic() > deadline:
            problems.append("the new samples were not placed in time")
            return {"accepted": accepted}
        time.sleep(0.5)
    pending = {s["shard"]: s for s in status["shards"] if s["pending_samples"]}
    print(f"pending samples by shard: { {k: s['pending_samples'] for k, s in pending.items()} }; "
          f"forcing their retrain (POST /admin/shards/{{k}}/retrain)")
    for shard in pending:
        client.retrain(shard)
    started = time.perf_counter()
    while True:
        now = {s["shard"]: s for s in client.status()["shards"]}
        if all(now[k]["version"] > pending[k]["version"] and now[k]["state"] == "serving" for k in pending):
            break
        if time.monotonic() > deadline:
            problems.append("the forced retrain did not publish in time")
            return {"accepted": accepted}
        time.sleep(1.0)
    print(f"retrained and hot-swapped in {time.perf_counter() - started:.1f} s (no quarantine)")
    named = []
    for shard in pending:
        version = now[shard]["version"]
        manifest = json.loads((run_dir / "adapters" / f"shard-{shard}" / f"v{version}" / "manifest.json").read_text())
        ids = sorted(new_ids & {s["sample_id"] for s in manifest["samples"]})
        print(f"shard {shard} v{version} manifest ({manifest['n_samples']} samples) names {ids}")
        named += ids
    if not named and accepted["samples"]["train"]:
        problems.append("no new version's manifest names the new samples")
    return {"accepted": accepted, "retrained": {k: now[k]["version"] for k in pending}, "manifest_names": len(named)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--run", type=Path, required=True, help="the served run folder")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for completion")
    args = parser.parse_args()
    client = Client(args.url, os.environ["APA_ADMIN_TOKEN"])
    client.wait_ready()
    user, probe = pick_users(args.run)

    print(f"\n== POST /recommend user {user} (no candidates: 20 popular unrated items, top 5)")
    started = time.perf_counter()
    answer = client.recommend(user, top_k=5)
    print(json.dumps(answer, indent=1), f"\n({time.perf_counter() - started:.1f} s)")

    problems: list[str] = []
    learned = learn(client, args.run, user, [item["item_id"] for item in answer["items"][:3]], args.timeout,
                    problems)

    print(f"\n== DELETE /users/{user}/interactions, then follow /deletions/{{id}}")
    forget = client.forget(user, probe_user=probe, probe_item=answer["items"][0]["item_id"], timeout_s=args.timeout)
    print(f"request {forget.request_id}: first status {forget.first_status}, shards {forget.affected_shards}")
    print(f"time to quarantine (DELETE -> first one-candidate /recommend without the shard): "
          f"{forget.seconds_to_quarantine:.3f} s" if forget.seconds_to_quarantine is not None else "NOT quarantined")
    print(f"DELETE -> {forget.deletion['status']}: "
          f"{forget.seconds_to_completed:.1f} s" if forget.seconds_to_completed else "not completed")
    print("\n== certificate\n" + json.dumps(forget.deletion["certificate"], indent=1))

    if forget.deletion["status"] != "completed" or forget.deletion["certificate"]["violations"] != 0:
        problems.append(f"deletion ended {forget.deletion['status']}: {forget.deletion.get('error')}")
    try:
        client.recommend(user, top_k=1)
        problems.append(f"/recommend still answers for user {user}")
    except APIError as exc:
        print(f"\n/recommend for user {user} now answers {exc.status_code}")
        if exc.status_code != 404:
            problems.append(f"/recommend for the deleted user answered {exc.status_code}, not 404")
    new = {c["shard"]: c["new_version"] for c in forget.deletion["certificate"]["shards"]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the gateway hot-swaps on the worker's event (or its ledger poll)
        live = {a["shard"]: a["version"] for a in client.recommend(probe, [answer["items"][0]["item_id"]])["adapters"]}
        if all(live.get(k) == v for k, v in new.items()):
            print(f"gateway serves the retrained versions: {live}")
            break
        time.sleep(0.5)
    else:
        problems.append(f"retrained versions {new} not served within 60 s")
    status = client.status()
    print("\n== GET /admin/status\n" + json.dumps(status, indent=1))
    for shard in status["shards"]:
        manifest = json.loads((args.run / "adapters" / f"shard-{shard['shard']}" / f"v{shard['version']}"
                               / "manifest.json").read_text())
        if any(s["user_id"] == user for s in manifest["samples"]):
            problems.append(f"serving manifest of shard {shard['shard']} lists a sample of user {user}")
    print(f"\nchecked {len(status['shards'])} serving manifests: none lists a sample of user {user}"
          if not any("manifest" in p for p in problems) else "")
    # The summary lies in the run folder, which must keep nothing that names the forgotten user: it gives
    # counts, not their id nor their samples' (the console above shows those while they exist).
    (args.run / "demo.json").write_text(json.dumps({
        "learned": learned, "request_id": forget.request_id, "affected_shards": forget.affected_shards,
        "seconds_to_quarantine": forget.seconds_to_quarantine, "seconds_to_completed": forget.seconds_to_completed,
        "certificate": forget.deletion["certificate"], "status": status, "problems": problems}, indent=1))
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
