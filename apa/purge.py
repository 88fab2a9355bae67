"""Remove deleted samples from a run folder once the retrain that forgets them is live.

What goes: the samples' rows in ``samples.parquet`` and ``run.json``, their rows in the validation
memory, their entries in every version's ``valid_predictions.json`` (the adapter weights and
manifest of a version are never touched), their embedding-cache entries, every superseded adapter
version trained on them, the ``single`` and SISA baselines if they saw any of them, the evaluation
passes cached under ``cache/eval`` and any unfinished training state under ``cache/train`` (both
only speed later runs up). The run folder keeps
the HMACs of the deleted interactions in ``forgotten.json``, so importing it into another ledger
(with the same ``APA_HMAC_KEY``) does not bring them back. Safe to run twice.
"""

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apa import artifacts, sisa
from apa.embeddings import EmbeddingCache
from apa.faults import crash_point


@dataclass
class PurgeReport:
    samples: int = 0
    cache_entries: int = 0
    prediction_files: int = 0
    folders: int = 0


FORGOTTEN = "forgotten.json"


def forgotten_hmacs(run_dir: Path) -> set[str]:
    path = run_dir / FORGOTTEN
    return set(artifacts.read_json(path)) if path.is_file() else set()


def purge_run_files(run_dir: Path, sample_ids: set[str], superseded: list[Path],
                    hmacs: set[str] | None = None, prompts: Iterable[str] = ()) -> PurgeReport:
    """``prompts``: texts of deleted samples the run folder does not list (ingested ones, kept in the
    ledger), whose embedding-cache entries go too."""
    report = PurgeReport()
    if hmacs and not hmacs <= forgotten_hmacs(run_dir):
        artifacts.write_json_atomic(run_dir / FORGOTTEN, sorted(forgotten_hmacs(run_dir) | hmacs))
    if not sample_ids and not superseded:
        return report
    doc = artifacts.read_json(artifacts.require_run(run_dir) / "run.json")
    frame = pd.read_parquet(run_dir / "samples.parquet")
    gone = frame["sample_id"].astype(str).isin(sample_ids)
    cache = EmbeddingCache(run_dir / "cache" / "embeddings", str(doc["base_model"]["sha256"]))
    for column in ("prompt", "history_prompt"):
        report.cache_entries += sum(cache.discard(text) for text in frame.loc[gone, column])
    report.cache_entries += sum(cache.discard(text) for text in prompts)
    report.samples = int(gone.sum())
    if report.samples:
        artifacts.replace_atomically(run_dir / "samples.parquet", lambda tmp: frame[~gone].to_parquet(tmp, index=False))
    if any(s in doc["samples"] for s in sample_ids):
        doc["samples"] = {k: v for k, v in doc["samples"].items() if k not in sample_ids}
        artifacts.write_json_atomic(run_dir / "run.json", doc)
    crash_point("purge.samples-removed")
    _purge_memory(run_dir / "memory" / "valid.npz", sample_ids)
    for path in run_dir.glob("**/v*/valid_predictions.json"):
        predictions = artifacts.read_json(path)
        if any(s in predictions for s in sample_ids):
            artifacts.write_json_atomic(path, {k: v for k, v in predictions.items() if k not in sample_ids})
            report.prediction_files += 1
    folders = [p for p in superseded if p.is_dir()]
    baselines = [artifacts.shard_dir(run_dir, artifacts.SINGLE), *sorted((run_dir / sisa.NAME).glob("shard-*"))]
    for folder in [v for b in baselines if b.is_dir() for v in sorted(b.glob("v*"))]:
        manifest = artifacts.read_json(folder / "manifest.json")
        trained_on = {s["sample_id"] for s in manifest["samples"]} | artifacts.selection_ids(manifest)
        if trained_on & sample_ids:
            folders.append(folder)
    folders += [p for p in (run_dir / "cache" / "eval", run_dir / "cache" / "train") if p.is_dir()]
    for folder in folders:
        shutil.rmtree(folder)
        report.folders += 1
    return report


def _purge_memory(path: Path, sample_ids: set[str]) -> None:
    if not path.is_file():
        return
    with np.load(path) as data:
        stored = {name: data[name] for name in data.files}
    keep = np.array([str(s) not in sample_ids for s in stored["sample_ids"]], dtype=bool)
    if keep.all():
        return
    kept = {name: value[keep] for name, value in stored.items()}
    artifacts.replace_atomically(path, lambda tmp: np.savez(tmp, **kept))
