"""Record a run folder in the ledger (``apa train`` does it, ``apa ledger import`` does it again).

Glue between the run folder (``apa.runs``, ``apa.artifacts``) and the ledger's subject modules, which
know nothing of files or torch.
"""

from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from apa import artifacts, data
from apa.ledger import run_import
from apa.metrics import auc
from apa.purge import forgotten_hmacs
from apa.runs import read_run
from apa.settings import CoreSettings


def version_record(run_dir: Path, shard: int, version: int, metrics: dict[str, Any] | None = None,
                   ) -> run_import.VersionRecord:
    path = artifacts.version_dir(run_dir, shard, version)
    doc = artifacts.read_json(path / "manifest.json")
    return run_import.VersionRecord(shard=shard, version=version, path=path,
                                    manifest_sha256=str(doc["manifest_sha256"]), n_samples=int(doc["n_samples"]),
                                    metrics={"training": doc.get("training"), **(metrics or {})})


def valid_auc(predictions: dict[str, float], labels: dict[str, int]) -> float | None:
    """AUC on the validation samples both know, or None without both labels among them."""
    ids = [s for s in labels if s in predictions]
    if len({labels[s] for s in ids}) < 2:
        return None
    return auc(np.array([labels[s] for s in ids]), np.array([predictions[s] for s in ids]))


def import_run(session: Session, run_dir: Path, settings: CoreSettings) -> run_import.ImportSummary:
    run = read_run(run_dir)
    doc = artifacts.read_json(run_dir / "run.json")
    dataset = data.load(run.config.dataset, datasets_dir=settings.datasets_dir, assets_dir=settings.assets_dir)
    labels = {s.sample_id: s.label for s in run.splits["valid"]}
    records = []
    for shard in range(run.config.shards):
        for version in artifacts.versions(artifacts.shard_dir(run_dir, shard)):
            folder = artifacts.version_dir(run_dir, shard, version)
            predictions = artifacts.read_json(folder / "valid_predictions.json")
            records.append(version_record(run_dir, shard, version, {"valid_auc": valid_auc(predictions, labels)}))
    return run_import.import_run(
        session=session, run_path=run_dir, dataset=dataset, splits=run.splits, shard_of=run.shard_of,
        config=run.config.as_dict(), base_model_name=str(doc["base_model"]["name"]),
        base_model_sha256=run.base_model_sha256, versions=records, key=settings.hmac_secret(),
        forgotten=forgotten_hmacs(run_dir),
    )
