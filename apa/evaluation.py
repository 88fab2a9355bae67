"""``apa eval``: test AUC of APA and its baselines on one run, with wall times.

Methods (all on the same test samples):

* ``apa_nd`` / ``apa_d`` — one forward with the APA-weighted mixture of the K shard adapters
  (exact ΔW = Σ w_k B_k A_k, or (Σ w_k B_k)(Σ w_k A_k)).
* ``single`` — one adapter trained on all training samples (the retrain-everything baseline).
* ``sisa`` — uniform average of the K shards' outputs; ``ensemble`` — their APA-weighted average
  (K forwards); ``best_shard`` — the shard with the best *validation* AUC. These three share the
  K per-shard passes.
* ``item_mean`` — the item's mean label over training targets only (no LLM, no peeking at
  histories, which can hold a test rating).
* ``base`` — the untrained model (read off the same forward that embeds the test prompts).

``valid_tau`` repeats ``apa_nd``, ``apa_d`` and ``ensemble`` with the temperature chosen on the
validation memory (``aggregation.choose_tau``) instead of the given one (the paper's 1000).
"""

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apa import aggregation, artifacts
from apa.aggregation import ValidationMemory, WeightsMode
from apa.embeddings import embed
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.errors import ConfigError, RunNotFound
from apa.metrics import auc
from apa.model import BaseModel, score_hidden
from apa.runs import RunData, embedding_cache, memory_path, read_run

METHODS = ("apa_nd", "apa_d", "single", "sisa", "ensemble", "best_shard", "item_mean", "base")


def serving_refs(run_dir: Path, shards: int) -> list[AdapterRef]:
    """The newest version of every shard."""
    refs = []
    for shard in range(shards):
        version = artifacts.latest_version(run_dir, shard)
        if version is None:
            raise RunNotFound(f"{run_dir}: shard {shard} has no adapter yet (resume with `apa train --out`)")
        refs.append(AdapterRef(shard=shard, version=version,
                               path=artifacts.version_dir(run_dir, shard, version)))
    return refs


def load_memory(run_dir: Path, refs: list[AdapterRef]) -> ValidationMemory:
    preds = [artifacts.read_json(ref.path / "valid_predictions.json") for ref in refs]
    return ValidationMemory.load(memory_path(run_dir), preds)


def item_mean_scores(run: RunData) -> np.ndarray:
    """Mean label of each test target item over training *targets* only (global mean if unseen)."""
    train = run.splits["train"]
    prior = float(np.mean([s.label for s in train]))
    sums: dict[str, list[int]] = {}
    for s in train:
        sums.setdefault(s.target_item_id, []).append(s.label)
    return np.array([float(np.mean(sums[s.target_item_id])) if s.target_item_id in sums else prior
                     for s in run.splits["test"]])


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - started, 3)
        return out


def evaluate(
    run_dir: Path, base: BaseModel, *, knn: int = 20, tau: float = aggregation.PAPER_TAU,
    weights_mode: WeightsMode = "per-sample", batch_size: int = 8,
) -> dict[str, Any]:
    run = read_run(run_dir)
    if run.base_model_sha256 != base.sha256:
        raise ConfigError("the loaded base model is not the one this run was trained on")
    k = run.config.shards
    test = run.splits["test"]
    prompts = [run.prompts[s.sample_id] for s in test]
    labels = np.array([s.label for s in test])
    cache = embedding_cache(run_dir, base)
    clock = _Clock()

    test_hidden = clock.run("base", lambda: embed(base, prompts, cache=cache, batch_size=batch_size,
                                                  desc="base / embed test"))
    scores: dict[str, np.ndarray] = {"base": score_hidden(base, torch.from_numpy(test_hidden)).numpy()}
    if weights_mode == "per-sample":
        queries = test_hidden
    else:
        queries = embed(base, [run.history_prompts[s.sample_id] for s in test], cache=cache,
                        batch_size=batch_size, desc="embed test histories")
    scores["item_mean"] = clock.run("item_mean", lambda: item_mean_scores(run))

    refs = serving_refs(run_dir, k)
    memory = load_memory(run_dir, refs)
    weights = aggregation.weights(memory, queries, mode=weights_mode, knn=knn, tau=tau)  # [n, K]
    choice = aggregation.choose_tau(memory, mode=weights_mode, knn=knn)  # fails before the passes, not after
    engine = TorchEngine(base)
    engine.load(refs)

    def per_shard() -> np.ndarray:
        return np.stack([
            engine.score(prompts, np.eye(k)[[s] * len(test)], batch_size=batch_size, desc=f"shard {s}")
            for s in range(k)
        ], axis=1)  # [n, K]

    shard_scores = clock.run("per_shard", per_shard)
    valid_auc = [auc(memory.labels, memory.predictions[:, s]) for s in range(k)]
    best = int(np.argmax(valid_auc))
    scores["sisa"] = shard_scores.mean(axis=1)
    scores["ensemble"] = (shard_scores * weights).sum(axis=1)
    scores["best_shard"] = shard_scores[:, best]
    for mode in ("nd", "d"):
        scores[f"apa_{mode}"] = clock.run(f"apa_{mode}", partial(
            engine.score, prompts, weights, mode=mode, batch_size=batch_size, desc=f"APA({mode.upper()})"))

    single_version = artifacts.latest_version(run_dir, artifacts.SINGLE)
    if single_version is not None:
        single = TorchEngine(base)
        single.load([AdapterRef(shard=0, version=single_version,
                                path=artifacts.version_dir(run_dir, artifacts.SINGLE, single_version))])
        scores["single"] = clock.run("single", lambda: single.score(
            prompts, np.ones((len(test), 1)), batch_size=batch_size, desc="single"))

    for name in ("sisa", "ensemble", "best_shard"):
        clock.seconds[name] = clock.seconds["per_shard"]
    chosen = aggregation.weights(memory, queries, mode=weights_mode, knn=knn, tau=choice.tau)  # [n, K]
    valid_tau = _with_valid_tau(choice, chosen, shard_scores, labels, scores, clock.seconds, engine, prompts,
                                tau=tau, batch_size=batch_size)
    return {
        "auc": {m: round(auc(labels, scores[m]), 4) for m in METHODS if m in scores},
        "seconds": {m: clock.seconds[m] for m in METHODS if m in clock.seconds},
        "config": {"run": str(run_dir), "knn": knn, "tau": tau, "weights": weights_mode,
                   "batch_size": batch_size, "n_test": len(test), "test_positive_rate":
                   round(float(labels.mean()), 4), **run.config.as_dict()},
        "shards": {
            "versions": [ref.version for ref in refs],
            "test_auc": [round(auc(labels, shard_scores[:, s]), 4) for s in range(k)],
            "valid_auc": [round(v, 4) for v in valid_auc],
            "best_shard": best,
            "mean_weights": np.round(weights.mean(axis=0), 4).tolist(),
        },
        "valid_tau": valid_tau,
    }


def _with_valid_tau(
    choice: aggregation.TauChoice, chosen: np.ndarray, shard_scores: np.ndarray, labels: np.ndarray,
    scores: dict[str, np.ndarray], seconds_of: dict[str, float], engine: TorchEngine, prompts: list[str], *,
    tau: float, batch_size: int,
) -> dict[str, Any]:
    """The weighted methods again with the weights ``chosen`` ([n, K]) of the validation-chosen tau;
    the passes of ``tau`` (and their ``seconds_of``) are reused when the choice is the same, so the
    report has the same keys either way."""
    out = {"ensemble": (shard_scores * chosen).sum(axis=1)}
    seconds: dict[str, float] = {}
    for mode in ("nd", "d"):
        if choice.tau == tau:
            out[f"apa_{mode}"] = scores[f"apa_{mode}"]
            seconds[f"apa_{mode}"] = seconds_of[f"apa_{mode}"]
            continue
        started = time.perf_counter()
        out[f"apa_{mode}"] = engine.score(prompts, chosen, mode=mode, batch_size=batch_size,
                                          desc=f"APA({mode.upper()}), tau {choice.tau:g}")
        seconds[f"apa_{mode}"] = round(time.perf_counter() - started, 3)
    return {
        "tau": choice.tau,
        "loo_valid_auc": {f"{t:g}": round(v, 4) for t, v in choice.valid_auc.items()},
        "auc": {m: round(auc(labels, s), 4) for m, s in out.items()},
        "seconds": seconds,
        "mean_weights": np.round(chosen.mean(axis=0), 4).tolist(),
    }


def markdown(report: dict[str, Any]) -> str:
    """The AUC table of a report, best first; ``seconds`` of shared passes are marked."""
    rows = ["| method | test AUC | seconds |", "|---|---:|---:|"]
    shared = {"sisa", "ensemble", "best_shard"}
    for method, value in sorted(report["auc"].items(), key=lambda kv: -kv[1]):
        seconds = report["seconds"].get(method)
        note = " (shared K passes)" if method in shared else ""
        rows.append(f"| {method} | {value:.4f} | {seconds if seconds is not None else '—'}{note} |")
    tuned = report.get("valid_tau")
    if tuned:
        rows.append("")
        rows.append(f"tau chosen on validation (leave one out): {tuned['tau']:g} (this table: "
                    f"{report['config']['tau']:g}); " + ", ".join(f"{m} {v:.4f}" for m, v in tuned["auc"].items()))
    return "\n".join(rows)
