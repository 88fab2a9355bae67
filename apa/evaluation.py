"""``apa eval``: test AUC of APA and its baselines on one run, with 95% intervals and wall times.

Methods (all on the same test samples):

* ``apa_nd`` / ``apa_d`` — one forward with the APA-weighted mixture of the K shard adapters (exact
  ΔW = Σ w_k B_k A_k, or (Σ w_k B_k)(Σ w_k A_k)), the attention (error, neighbours, tau) chosen on
  the validation memory alone (``aggregation.choose_attention``, leave one out).
* ``apa_nd_paper`` — ``apa_nd`` at the paper's fixed attention (mae, 20 neighbours, tau 1000).
* ``single`` — one adapter trained on all training samples (the retrain-everything baseline).
* ``sisa`` — SISA: the uniform average of the outputs of K adapters trained on a *random* partition.
* ``avg_semantic`` — the uniform average of the K semantic shards' outputs (the paper's "Average").
* ``ensemble`` — the semantic shards' outputs averaged with APA's weights (K forwards).
* ``best_shard`` — the shard with the best *validation* AUC.
* ``item_mean`` — the item's mean label over training targets only (no LLM, no peeking at
  histories, which can hold a test rating).
* ``base`` — the untrained model (read off the same forward that embeds the test prompts).

Every AUC comes with a 95% stratified bootstrap interval over the test samples, and the differences
that matter with paired intervals (``apa.metrics``). Each forward pass over the test prompts is kept
under ``<run>/cache/eval`` keyed by the adapter files, weights and prompts, so an interrupted or
repeated evaluation only runs what it has not run. The per-sample predictions of every method, with
the weights, are returned as a table (``apa eval`` writes it beside the report).
"""

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from apa import aggregation, artifacts, sisa
from apa.aggregation import PAPER, AttentionChoice, AttentionGrid, ValidationMemory, WeightsMode
from apa.embeddings import cosine, embed, normalise_rows
from apa.engines.base import AdapterRef, Mode
from apa.engines.torch import TorchEngine
from apa.errors import ConfigError
from apa.hashing import sha256_file, sha256_json, sha256_text
from apa.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, auc, intervals
from apa.model import BaseModel, score_hidden
from apa.runs import RunData, embedding_cache, memory_path, read_run
from apa.samples import Sample

METHODS = ("apa_nd", "apa_nd_paper", "apa_d", "single", "sisa", "avg_semantic", "ensemble", "best_shard",
           "item_mean", "base")
PAIRS = [("apa_nd", "single"), ("apa_nd", "sisa"), ("apa_nd", "best_shard"), ("apa_nd", "avg_semantic"),
         ("apa_nd", "apa_nd_paper")]


def serving_refs(run_dir: Path, shards: int) -> list[AdapterRef]:
    """The newest version of every shard."""
    return artifacts.adapter_refs(run_dir, list(range(shards)))


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


class PassCache:
    """Finished forward passes over the test prompts, one JSON file each, keyed by what decides them:
    the adapter files' sha256, the weights, the mode and the prompts. Stores the pass's seconds too,
    so a resumed evaluation reports the time the pass took."""

    def __init__(self, root: Path, sample_ids: Sequence[str], prompts: Sequence[str], batch_size: int) -> None:
        self.root, self.sample_ids, self.batch_size = root, list(sample_ids), batch_size
        self.prompts_sha256 = sha256_text("\n".join(prompts))
        self._file_sha: dict[Path, str] = {}

    def _adapter_sha(self, ref: AdapterRef) -> str:
        path = ref.path / "adapter_model.safetensors"
        if path not in self._file_sha:
            self._file_sha[path] = sha256_file(path)
        return self._file_sha[path]

    def run(self, refs: Sequence[AdapterRef], weights: np.ndarray, mode: Mode,
            compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
        w = np.ascontiguousarray(weights, dtype=np.float64)
        key = sha256_json({"adapters": [self._adapter_sha(r) for r in refs], "mode": mode,
                           "weights": hashlib.sha256(w.tobytes()).hexdigest(),
                           "prompts": self.prompts_sha256, "batch_size": self.batch_size})
        path = self.root / f"{key[:32]}.json"
        if path.is_file():
            doc = artifacts.read_json(path)
            return np.array([doc["predictions"][s] for s in self.sample_ids]), float(doc["seconds"])
        started = time.perf_counter()
        scores = compute()
        seconds = round(time.perf_counter() - started, 3)
        artifacts.write_json_atomic(path, {"seconds": seconds, "predictions": dict(
            zip(self.sample_ids, (float(p) for p in scores), strict=True))})
        return scores, seconds


def _cluster_auc(labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray, k: int) -> list[list[float | None]]:
    """AUC of each shard (column) on the test samples of each cluster (row); None without both labels."""
    table: list[list[float | None]] = []
    for c in range(k):
        rows = clusters == c
        both = len(set(labels[rows].tolist())) == 2
        table.append([round(auc(labels[rows], scores[rows, s]), 4) if both else None for s in range(k)])
    return table


def _routing(w: np.ndarray, clusters: np.ndarray | None) -> dict[str, Any]:
    """How the weights spread ([n, K]): mean weights, mean entropy (nats; log K is uniform) and, for a
    semantic run, the weight on and the share routed to the sample's own cluster's shard."""
    out: dict[str, Any] = {"mean_weights": np.round(w.mean(axis=0), 4).tolist(),
                           "mean_entropy": round(float(aggregation.entropy(w).mean()), 4),
                           "uniform_entropy": round(float(np.log(w.shape[1])), 4)}
    if clusters is not None:
        rows = np.arange(len(w))
        out["own_cluster_weight"] = round(float(w[rows, clusters].mean()), 4)
        out["own_cluster_top"] = round(float((w.argmax(axis=1) == clusters).mean()), 4)
    return out


@dataclass
class _Scored:
    """Every method's test scores and what they came from (``evaluate``'s first step)."""

    test: list[Sample]
    labels: np.ndarray  # [n]
    test_hidden: np.ndarray  # [n, hidden]
    refs: list[AdapterRef]  # the serving shards
    memory: ValidationMemory
    choice: AttentionChoice  # chosen on validation
    paper: AttentionChoice  # the paper's (mae, 20, 1000)
    chosen_w: np.ndarray  # [n, K]
    paper_w: np.ndarray  # [n, K]
    shard_scores: np.ndarray  # [n, K]
    valid_auc: list[float]  # [K]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [n]
    seconds: dict[str, float] = field(default_factory=dict)  # method -> seconds of its passes


def evaluate(
    run_dir: Path, base: BaseModel, *, weights_mode: WeightsMode = "per-sample", grid: AttentionGrid | None = None,
    batch_size: int = 8, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The report (AUCs, intervals, seconds, attention, routing evidence) and the per-sample table."""
    run = read_run(run_dir)
    if run.base_model_sha256 != base.sha256:
        raise ConfigError("the loaded base model is not the one this run was trained on")
    scored = _score_methods(run_dir, run, base, weights_mode, grid, batch_size)
    clusters = (None if run.centres is None
                else np.argmax(cosine(normalise_rows(scored.test_hidden), run.centres), axis=1))
    config = {"run": str(run_dir), "weights": weights_mode, "batch_size": batch_size, "n_test": len(scored.test),
              "test_positive_rate": round(float(scored.labels.mean()), 4), **run.config.as_dict()}
    report = _report(run, scored, clusters, config=config, grid=grid or AttentionGrid(), resamples=resamples,
                     seed=seed)
    return report, _table(run, scored, clusters)


def _score_methods(run_dir: Path, run: RunData, base: BaseModel, weights_mode: WeightsMode,
                   grid: AttentionGrid | None, batch_size: int) -> _Scored:
    """Score the test split with every method (each pass cached under ``cache/eval``)."""
    k = run.config.shards
    test = run.splits["test"]
    ids = [s.sample_id for s in test]
    prompts = [run.prompts[i] for i in ids]
    cache = embedding_cache(run_dir, base)
    passes = PassCache(run_dir / "cache" / "eval", ids, prompts, batch_size)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    test_hidden = embed(base, prompts, cache=cache, batch_size=batch_size, desc="base / embed test",
                        noun=run.config.noun)  # [n, hidden]
    seconds["base"] = round(time.perf_counter() - started, 3)
    scores: dict[str, np.ndarray] = {"base": score_hidden(base, torch.from_numpy(test_hidden)).numpy(),
                                     "item_mean": item_mean_scores(run)}
    seconds["item_mean"] = 0.0
    queries = test_hidden if weights_mode == "per-sample" else embed(
        base, [run.history_prompts[i] for i in ids], cache=cache, batch_size=batch_size, desc="embed test histories",
        noun=run.config.noun)

    refs = serving_refs(run_dir, k)
    memory = load_memory(run_dir, refs)
    choice = aggregation.choose_attention(memory, mode=weights_mode, grid=grid)
    paper = aggregation.choose_attention(memory, mode=weights_mode, grid=AttentionGrid(
        (PAPER.error,), (PAPER.knn,), (PAPER.tau,)))
    chosen_w = aggregation.weights(memory, queries, mode=weights_mode, attention=choice.attention)  # [n, K]
    paper_w = aggregation.weights(memory, queries, mode=weights_mode, attention=PAPER)  # [n, K]

    def forward(name: str, adapters: list[AdapterRef], w: np.ndarray, mode: Mode = "nd") -> np.ndarray:
        def compute() -> np.ndarray:
            engine = TorchEngine(base)
            engine.load(adapters)
            if (w == w[0]).all():  # one weight row for all (a shard, single, SISA): the template is shared
                return engine.score_shared(prompts, w[0], mode=mode, batch_size=batch_size, desc=name)
            return engine.score(prompts, w, mode=mode, batch_size=batch_size, desc=name)

        out, seconds[name] = passes.run(adapters, w, mode, compute)
        return out

    def per_shard(name: str, adapters: list[AdapterRef]) -> np.ndarray:
        cols = [forward(f"{name} {s}", adapters, np.eye(k)[[s] * len(test)]) for s in range(k)]
        return np.stack(cols, axis=1)  # [n, K]

    shard_scores = per_shard("shard", refs)
    shard_seconds = round(sum(seconds.pop(f"shard {s}") for s in range(k)), 3)
    scores["avg_semantic"] = shard_scores.mean(axis=1)
    scores["ensemble"] = (shard_scores * chosen_w).sum(axis=1)
    valid_auc = [auc(memory.labels, memory.predictions[:, s]) for s in range(k)]
    scores["best_shard"] = shard_scores[:, int(np.argmax(valid_auc))]
    for name in ("avg_semantic", "ensemble", "best_shard"):
        seconds[name] = shard_seconds
    sisa_adapters = sisa.refs(run_dir, k, own=run.own_sisa())
    if sisa_adapters is not None:
        scores["sisa"] = per_shard("sisa", sisa_adapters).mean(axis=1)
        seconds["sisa"] = round(sum(seconds.pop(f"sisa {s}") for s in range(k)), 3)
    scores["apa_nd"] = forward("apa_nd", refs, chosen_w, "nd")
    scores["apa_d"] = forward("apa_d", refs, chosen_w, "d")
    scores["apa_nd_paper"] = forward("apa_nd_paper", refs, paper_w, "nd")
    if artifacts.latest_version(run_dir, artifacts.SINGLE) is not None:
        single = artifacts.adapter_refs(run_dir, [artifacts.SINGLE])
        scores["single"] = forward("single", single, np.ones((len(test), 1)))
    return _Scored(test=test, labels=np.array([s.label for s in test]), test_hidden=test_hidden, refs=refs,
                   memory=memory, choice=choice, paper=paper, chosen_w=chosen_w, paper_w=paper_w,
                   shard_scores=shard_scores, valid_auc=valid_auc, scores=scores, seconds=seconds)


def _report(run: RunData, scored: _Scored, clusters: np.ndarray | None, *, config: dict[str, Any],
            grid: AttentionGrid, resamples: int, seed: int) -> dict[str, Any]:
    """AUCs with intervals and paired differences, seconds, the attention, the shards and the routing."""
    k, labels, scores = run.config.shards, scored.labels, scored.scores
    methods = [m for m in METHODS if m in scores]
    ci, paired = intervals(labels, {m: scores[m] for m in methods}, PAIRS, resamples=resamples, seed=seed)
    shards: dict[str, Any] = {
        "versions": [ref.version for ref in scored.refs],
        "test_auc": [round(auc(labels, scored.shard_scores[:, s]), 4) for s in range(k)],
        "valid_auc": [round(v, 4) for v in scored.valid_auc],
        "best_shard": int(np.argmax(scored.valid_auc)),
        "epoch_kept": [_training(ref).get("epoch_kept") for ref in scored.refs],
        "selection": [_training(ref).get("selection") for ref in scored.refs],
    }
    if clusters is not None:
        shards["test_cluster_sizes"] = np.bincount(clusters, minlength=k).tolist()
        shards["cluster_test_auc"] = _cluster_auc(labels, scored.shard_scores, clusters, k)
    return {
        "auc": {m: round(auc(labels, scores[m]), 4) for m in methods},
        "ci95": ci,
        "paired": paired,
        "seconds": {m: scored.seconds[m] for m in methods},
        "config": config,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "stratified": True},
        "attention": {"chosen": scored.choice.as_dict(), "paper": scored.paper.as_dict(), "grid": grid.as_dict(),
                      "loo_valid_auc": scored.choice.table},
        "shards": shards,
        "routing": {"chosen": _routing(scored.chosen_w, clusters), "paper": _routing(scored.paper_w, clusters)},
    }


def _table(run: RunData, scored: _Scored, clusters: np.ndarray | None) -> pd.DataFrame:
    """One row per test sample: its label, every method's score, the chosen and the paper's weights."""
    k = run.config.shards
    table = pd.DataFrame({"sample_id": [s.sample_id for s in scored.test],
                          "user_id": [s.user_id for s in scored.test], "label": scored.labels})
    for m in METHODS:
        if m in scored.scores:
            table[m] = scored.scores[m]
    for s in range(k):
        table[f"w_{s}"] = scored.chosen_w[:, s]
    for s in range(k):
        table[f"w_paper_{s}"] = scored.paper_w[:, s]
    if clusters is not None:
        table["cluster"] = clusters
    return table


def _training(ref: AdapterRef) -> dict[str, Any]:
    training: dict[str, Any] = artifacts.read_json(ref.path / "manifest.json").get("training") or {}
    return training


def predictions_path(report: Path) -> Path:
    """``<name>-predictions.csv.gz`` beside ``<name>.json``."""
    return report.with_name(f"{report.stem}-predictions.csv.gz")


def recompute_auc(table: pd.DataFrame, methods: Sequence[str]) -> dict[str, float]:
    """The AUCs a per-sample table gives (what a reader checks the report against)."""
    return {m: round(auc(table["label"].to_numpy(), table[m].to_numpy()), 4) for m in methods}


def markdown(report: dict[str, Any]) -> str:
    """The AUC table of a report, best first, with intervals; ``seconds`` of shared passes are marked."""
    rows = ["| method | test AUC | 95% CI | seconds |", "|---|---:|---|---:|"]
    shared = {"avg_semantic", "ensemble", "best_shard"}
    for method, value in sorted(report["auc"].items(), key=lambda kv: -kv[1]):
        low, high = report["ci95"][method]
        secs = report["seconds"].get(method)
        note = " (shared K passes)" if method in shared else ""
        rows.append(f"| {method} | {value:.4f} | [{low:.4f}, {high:.4f}] | {secs}{note} |")
    rows.append("")
    for pair, (diff, low, high) in report["paired"].items():
        rows.append(f"* {pair}: {diff:+.4f} [{low:+.4f}, {high:+.4f}] (paired 95% CI)")
    chosen = report["attention"]["chosen"]
    rows.append(f"* attention chosen on validation (leave one out, {chosen['samples']} samples): error "
                f"{chosen['error']}, knn {chosen['knn']}, tau {chosen['tau']:g} (LOO AUC "
                f"{chosen['loo_valid_auc']:.4f}; the paper's mae/20/1000: "
                f"{report['attention']['paper']['loo_valid_auc']:.4f})")
    return "\n".join(rows)
