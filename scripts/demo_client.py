"""The demo's client half: ask /recommend, forget a user, follow the deletion to `completed`, check it.

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


def pick_users(run_dir: Path) -> tuple[str, str]:
    """A user whose training samples sit in exactly one shard (the others keep serving), and a probe user."""
    frame = pd.read_parquet(run_dir / "samples.parquet")
    train = frame[frame["split"] == "train"]
    shards = train.groupby("user_id")["shard"].nunique()
    one = sorted(shards[shards == 1].index, key=lambda u: (len(u), u))
    target = str(one[0])
    probe = str(next(u for u in sorted(set(frame["user_id"]), key=lambda u: (len(u), u)) if u != target))
    return target, probe


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

    print(f"\n== DELETE /users/{user}/interactions, then follow /deletions/{{id}}")
    forget = client.forget(user, probe_user=probe, probe_item=answer["items"][0]["item_id"], timeout_s=args.timeout)
    print(f"request {forget.request_id}: first status {forget.first_status}, shards {forget.affected_shards}")
    print(f"time to quarantine (DELETE -> first one-candidate /recommend without the shard): "
          f"{forget.seconds_to_quarantine:.3f} s" if forget.seconds_to_quarantine is not None else "NOT quarantined")
    print(f"DELETE -> {forget.deletion['status']}: "
          f"{forget.seconds_to_completed:.1f} s" if forget.seconds_to_completed else "not completed")
    print("\n== certificate\n" + json.dumps(forget.deletion["certificate"], indent=1))

    problems = []
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
    (args.run / "demo.json").write_text(json.dumps({
        "user": user, "request_id": forget.request_id, "affected_shards": forget.affected_shards,
        "seconds_to_quarantine": forget.seconds_to_quarantine, "seconds_to_completed": forget.seconds_to_completed,
        "certificate": forget.deletion["certificate"], "status": status, "problems": problems}, indent=1))
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
