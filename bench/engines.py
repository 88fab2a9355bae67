"""The torch engine against the vLLM engine on the same scoring load: one user's candidates per request.

Each request is one MovieLens-100K user's 20 candidate prompts (their 10 latest ratings as history,
20 random unrated titles) scored with that request's own shard weights (a Dirichlet draw over K
random rank-8 LoRA shards, q_proj + v_proj), through ``score_shared`` as the gateway calls it. The
torch engine runs in this process (one model thread: concurrent requests queue for it, as in the
gateway); the vLLM engine talks to a vLLM server this script starts from ``.venv-vllm``
(``scripts/vllm-serve.sh``) and stops afterwards. Per engine and concurrency level: p50/p99 request
latency, throughput (candidates/s), the first request's time (warm-up) and memory (resident set of this
process for torch, of the server's processes for vLLM). Every vLLM p(yes) is compared with the torch
engine's for the same request (``max_abs_diff_vs_torch``). ``same_weights_c1`` repeats the first level
with one weight vector for every request, so its adapter is built and loaded once: the difference to
level 1 is what a new adapter per request costs. With ``--weight-steps`` the effect of
snapping the weights to a grid (fewer distinct adapters) on p(yes) is measured with the torch engine.

    python bench/engines.py --out docs/results/engines.json
    python bench/engines.py --quick --out docs/results/engines-quick.json

On a GPU, against a running server (e.g. the official vLLM image with the flags of docker-compose's
``vllm`` profile) instead of one started here; ``--adapter-dir`` must be a folder the server reads at
the same path (a bind mount at the same path in its container):

    python bench/engines.py --device cuda --vllm-url http://127.0.0.1:8000 --adapter-dir /shared/vllm-adapters
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from apa import prompts
from apa.data import movielens_100k
from apa.engines.base import Mode
from apa.engines.merge import snap_weights
from apa.engines.torch import TorchEngine
from apa.engines.vllm import VllmEngine
from apa.model import load_base_model
from apa.settings import get_settings
from bench.engine import random_adapters
from bench.machine import command_line, describe, write_report

ROOT = Path(__file__).parents[1]
CANDIDATES = 20


def user_requests(n: int, seed: int = 0) -> list[list[str]]:
    """``n`` users' candidate prompts: their 10 latest ratings as history, 20 titles they never rated."""
    dataset = movielens_100k(get_settings().assets_dir)
    titles = dataset.titles
    rng = np.random.default_rng(seed)
    ratings = dataset.interactions.sort_values(["user_id", "timestamp", "item_id"])
    users = rng.choice(sorted(ratings["user_id"].unique()), n, replace=False)
    out = []
    for user in users:
        rows = ratings[ratings["user_id"] == user].tail(10)
        liked = [titles[i] for i, r in zip(rows["item_id"], rows["rating"], strict=True) if r > 3]
        disliked = [titles[i] for i, r in zip(rows["item_id"], rows["rating"], strict=True) if r <= 3]
        unrated = sorted(set(titles) - set(ratings.loc[ratings["user_id"] == user, "item_id"]))
        targets = rng.choice(unrated, CANDIDATES, replace=False)
        out.append([prompts.sample_prompt(liked, disliked, titles[t]) for t in targets])
    return out


def resident_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def vllm_server(model_dir: Path, log: Path, *, venv: Path = ROOT / ".venv-vllm", timeout_s: float = 600.0,
                env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A vLLM server started with scripts/vllm-serve.sh on a free port, in its own process group, stopped
    on exit: yields (its URL, the process)."""
    port = free_port()
    environment = {**os.environ, "APA_VLLM_PORT": str(port), "APA_BASE_MODEL_PATH": str(model_dir),
                   "APA_VLLM_VENV": str(venv), **(env or {})}
    with log.open("w") as out:
        process = subprocess.Popen(["bash", str(ROOT / "scripts" / "vllm-serve.sh")], env=environment, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not up after {timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_load(score: Callable[[int], np.ndarray], n: int, concurrency: int) -> tuple[list[float], float, dict]:
    """Requests 0..n-1, ``concurrency`` at a time: (latencies, wall seconds, request -> p(yes))."""
    latencies: list[float] = []
    results: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        started = time.perf_counter()
        results[i] = score(i)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return latencies, time.perf_counter() - started, results


def summarise(latencies: list[float], wall: float, n: int) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"requests": n, "p50_s": round(statistics.median(ordered), 3),
            "p99_s": round(float(np.percentile(ordered, 99)), 3),
            "throughput_cps": round(n * CANDIDATES / wall, 2), "wall_s": round(wall, 2)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--requests", type=int, default=12, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--mode", choices=["nd", "d"], default="nd")
    parser.add_argument("--weight-steps", default="0.05,0.1", help="grids whose effect on p(yes) is measured")
    parser.add_argument("--quick", action="store_true", help="4 requests, concurrency 1 and 4")
    parser.add_argument("--device", default="cpu", help="the torch engine's device")
    parser.add_argument("--vllm-url", help="a running vLLM server (default: start one from .venv-vllm)")
    parser.add_argument("--adapter-dir", type=Path, help="merged adapters, where the server reads them")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 4, "1,4"
    return args


@dataclass(frozen=True)
class Load:
    """The requests every engine answers: a fresh set of ``per_level`` per concurrency level after one
    warm-up request, each with its own per-user weights."""

    requests: list[list[str]]  # candidate prompts per request
    weights: np.ndarray  # [requests, K]
    levels: list[int]
    per_level: int
    mode: Mode

    def first(self, level_index: int) -> int:
        return 1 + level_index * self.per_level


def measure_torch(engine: TorchEngine, load: Load) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """The torch engine in this process (one model thread): latency per level, and its p(yes) per request."""
    model_lock = threading.Lock()

    def torch_score(i: int) -> np.ndarray:
        with model_lock:
            return engine.score_shared(load.requests[i], load.weights[i], mode=load.mode)

    torch_p: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    torch_p[0] = torch_score(0)
    entry: dict[str, Any] = {"warmup_first_request_s": round(time.perf_counter() - started, 2), "levels": {}}
    for level_index, c in enumerate(load.levels):
        first = load.first(level_index)
        engine.drop_cached()

        def level_score(i: int, first: int = first) -> np.ndarray:
            return torch_score(first + i)

        lat, wall, p = run_load(level_score, load.per_level, c)
        torch_p.update({first + i: x for i, x in p.items()})
        entry["levels"][str(c)] = summarise(lat, wall, load.per_level)
        print(f"torch c={c}: {entry['levels'][str(c)]}", flush=True)
    entry["memory_mb"] = resident_mb([os.getpid()])
    entry.update(entry["levels"][str(load.levels[0])])
    return entry, torch_p


def measure_weight_grid(engine: TorchEngine, load: Load, torch_p: dict[int, np.ndarray],
                        steps: list[float]) -> dict[str, Any]:
    """What snapping the weights to a grid does to p(yes) (torch engine, exact otherwise)."""
    grid: dict[str, Any] = {}
    for step in steps:
        diffs = []
        for i in sorted(torch_p)[:load.per_level]:
            snapped = snap_weights(load.weights[i], step)
            diffs.append(float(np.abs(torch_p[i] - engine.score_shared(load.requests[i], snapped,
                                                                       mode=load.mode)).max()))
        grid[str(step)] = {"max_weight_move": step, "max_abs_diff_p_yes": round(max(diffs), 5),
                           "median_of_max_abs_diff": round(statistics.median(diffs), 5), "requests": len(diffs)}
        print(f"weight step {step}: {grid[str(step)]}", flush=True)
    shards = load.weights.shape[1]
    spread = []  # for scale: how far p(yes) moves between one shard alone and the request's mixture
    for i in sorted(torch_p)[:4]:
        spread += [float(np.abs(torch_p[i] - engine.score_shared(load.requests[i], np.eye(shards)[k],
                                                                  mode=load.mode)).max())
                   for k in range(shards)]
    grid["one_shard_vs_mixture_max_abs_diff_p_yes"] = round(max(spread), 5)
    return grid


def measure_vllm(vllm: VllmEngine, load: Load, torch_p: dict[int, np.ndarray]) -> dict[str, Any]:
    """The vLLM engine on the same requests: latency per level, one adapter for all, and the largest
    difference from the torch engine's p(yes)."""
    started = time.perf_counter()
    diffs = [float(np.abs(vllm.score_shared(load.requests[0], load.weights[0], mode=load.mode) - torch_p[0]).max())]
    entry: dict[str, Any] = {"warmup_first_request_s": round(time.perf_counter() - started, 2), "levels": {}}
    for level_index, c in enumerate(load.levels):
        first = load.first(level_index)

        def vllm_score(i: int, first: int = first) -> np.ndarray:
            return vllm.score_shared(load.requests[first + i], load.weights[first + i], mode=load.mode)

        lat, wall, p = run_load(vllm_score, load.per_level, c)
        diffs += [float(np.abs(x - torch_p[first + i]).max()) for i, x in p.items()]
        entry["levels"][str(c)] = summarise(lat, wall, load.per_level)
        print(f"vllm c={c}: {entry['levels'][str(c)]}", flush=True)
    fixed, wall, _ = run_load(lambda i: vllm.score_shared(load.requests[1 + i], load.weights[0], mode=load.mode),
                              load.per_level, 1)  # one weight vector for all: its adapter is loaded
    entry["same_weights_c1"] = summarise(fixed, wall, load.per_level)
    print(f"vllm, one adapter for all requests, c=1: {entry['same_weights_c1']}", flush=True)
    entry["max_abs_diff_vs_torch"] = float(f"{max(diffs):.3g}")
    entry.update(entry["levels"][str(load.levels[0])])
    return entry


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    steps = [float(s) for s in args.weight_steps.split(",") if s]
    model_dir = get_settings().base_model_dir
    torch.manual_seed(0)
    requests = user_requests(args.requests * (len(levels) + 1))  # a fresh set per level, one for warm-up
    weights = np.random.default_rng(1).dirichlet(np.ones(args.shards), len(requests))  # [requests, K]: per user
    load = Load(requests=requests, weights=weights, levels=levels, per_level=args.requests, mode=args.mode)

    report: dict[str, Any] = {"benchmark": "engines", "machine": describe(args.device),
                              "command": command_line("bench/engines.py"),
                              "load": {"candidates_per_request": CANDIDATES, "shards": args.shards, "rank": 8,
                                       "mode": args.mode, "requests_per_level": args.requests,
                                       "weights": "a Dirichlet(1) draw per request: one adapter per request"},
                              "note": "shared 2-core machine: other engineers' test runs were using the same "
                                      "cores, so absolute times are noisy; both engines ran the same requests"}
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_model(model_dir)
        refs, _ = random_adapters(base, args.shards, Path(tmp) / "shards")
        engine = TorchEngine(load_base_model(model_dir, device=args.device), prefix_cache_bytes=256 * 2**20)
        engine.load(refs)
        report["torch"], torch_p = measure_torch(engine, load)
        report["weight_grid"] = measure_weight_grid(engine, load, torch_p, steps)
        engine.drop_cached()

        started = time.perf_counter()  # the vLLM engine, against a server of its own
        server: AbstractContextManager[tuple[str, subprocess.Popen[bytes] | None]] = (
            nullcontext((args.vllm_url, None)) if args.vllm_url else vllm_server(model_dir, Path(tmp) / "vllm.log"))
        with server as (url, process):
            server_start = round(time.perf_counter() - started, 1)
            vllm = VllmEngine(base, url=url, adapter_dir=args.adapter_dir or Path(tmp) / "merged", max_adapters=8)
            vllm.load(refs)
            entry = {"server_start_s": server_start, **measure_vllm(vllm, load, torch_p)}
            if process is not None:  # a server of our own: its processes' resident memory
                entry["memory_mb"] = resident_mb(process_tree(process.pid))
            vllm.close()
        report["vllm"] = entry
    print(json.dumps({k: report[k] for k in ("torch", "vllm")}, indent=1))
    write_report(report, args.out)


if __name__ == "__main__":
    main()
