"""Record a run folder in the ledger: the worker does it for each new version, ``apa train`` and
``apa ledger import`` for a whole run (through the CLI, the one door that starts the processes).

Glue between the run folder (``apa.runs``, ``apa.artifacts``), which needs the ML stack, and the
ledger's subject modules, which know nothing of files or torch; so it lives above both.
"""

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from apa import artifacts, data
from apa.metrics import valid_auc
from apa.purge import forgotten_hmacs
from apa.runs import ExtraSample, read_run
from apa.samples import from_content
from apa.settings import CoreSettings
from ledger import backlog, run_import


def version_record(run_dir: Path, shard: int, version: int, metrics: dict[str, Any] | None = None,
                   ) -> run_import.VersionRecord:
    path = artifacts.version_dir(run_dir, shard, version)
    doc = artifacts.read_json(path / "manifest.json")
    return run_import.VersionRecord(shard=shard, version=version, path=path,
                                    manifest_sha256=str(doc["manifest_sha256"]), n_samples=int(doc["n_samples"]),
                                    metrics={"training": doc.get("training"),
                                             "adapter_sha256": doc.get("adapter_sha256"),
                                             "verify": artifacts.verify_command(run_dir, shard, version),
                                             **(metrics or {})})


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


def extra_samples(records: list[backlog.IngestedRecord]) -> list[ExtraSample]:
    """Ingested samples as the ledger keeps them, for ``RunData.with_samples``."""
    return [ExtraSample(split=r.split, shard=r.shard, sample=from_content(r.content), prompt=r.prompt,
                        history_prompt=r.history_prompt) for r in records]
