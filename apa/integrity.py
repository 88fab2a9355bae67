"""``apa check``: a run's adapters are what their manifests say, and the shards split the data exactly.

Checks, for the newest version of every shard (and of the single and SISA baselines, PEFT only):

* the manifest hash recomputes from its samples, config, seed and base-model hash;
* the shard manifests are pairwise disjoint and together cover the run's training split;
* each adapter folder loads with ``peft.PeftModel.from_pretrained`` on the base model.
"""

from dataclasses import dataclass, field
from pathlib import Path

from apa import artifacts, sisa
from apa.model import BaseModel
from apa.runs import read_run


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_run(run_dir: Path, base: BaseModel | None = None) -> CheckReport:
    """Check a run folder; with ``base`` given, also load every adapter with PEFT."""
    run = read_run(run_dir)
    report = CheckReport()
    owner: dict[str, int] = {}
    folders: list[Path] = []
    for shard in range(run.config.shards):
        version = artifacts.latest_version(run_dir, shard)
        if version is None:
            report.problems.append(f"shard {shard}: no adapter version")
            continue
        folder = artifacts.version_dir(run_dir, shard, version)
        folders.append(folder)
        doc = artifacts.read_json(folder / "manifest.json")
        if artifacts.manifest_sha256(doc) != doc["manifest_sha256"]:
            report.problems.append(f"shard {shard} v{version}: manifest_sha256 does not recompute")
        if doc["base_model_sha256"] != run.base_model_sha256:
            report.problems.append(f"shard {shard} v{version}: trained on another base model")
        for sample in doc["samples"]:
            other = owner.setdefault(sample["sample_id"], shard)
            if other != shard:
                report.problems.append(f"sample {sample['sample_id']} is in shards {other} and {shard}")
        report.checked.append(f"shard {shard} v{version}: {doc['n_samples']} samples, "
                              f"manifest {doc['manifest_sha256'][:12]}")
    train_ids = {s.sample_id for s in run.splits["train"]}
    if set(owner) != train_ids:
        report.problems.append(f"shards cover {len(set(owner) & train_ids)} of {len(train_ids)} training "
                               f"samples and {len(set(owner) - train_ids)} samples outside it")
    else:
        report.checked.append(f"shard manifests are disjoint and cover all {len(train_ids)} training samples")
    for baseline in [artifacts.SINGLE, *(sisa.adapter_id(k) for k in range(run.config.shards))]:
        version = artifacts.latest_version(run_dir, baseline)
        if version is not None:
            folders.append(artifacts.version_dir(run_dir, baseline, version))
    if base is not None:
        for folder in folders:
            problem = _peft_load_problem(base, folder)
            if problem:
                report.problems.append(problem)
            else:
                report.checked.append(f"{folder.relative_to(run_dir)} loads with peft.PeftModel.from_pretrained")
    return report


def _peft_load_problem(base: BaseModel, folder: Path) -> str | None:
    import copy

    from peft import PeftModel

    from apa.engines.mixture import strip_mixture

    try:
        PeftModel.from_pretrained(strip_mixture(copy.deepcopy(base.model)), str(folder))
    except Exception as exc:  # any failure to load is the finding itself
        return f"{folder}: PEFT cannot load it ({type(exc).__name__}: {exc})"
    return None
