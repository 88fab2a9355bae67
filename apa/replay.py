"""``apa verify``: retrain an adapter version from its manifest and compare the weights' bytes.

Training is deterministic (seeded LoRA init, dropout and batch order; deterministic kernels; the same
bytes with 1 or 2 CPU threads, measured), so a version's weights are a function of what its manifest
records: the samples and their order, the validation samples that chose the epoch, the training
config, the seed and the base model (and the code's versions, recorded beside them). A replay
rebuilds the samples from the run folder, checks each one's content against the manifest, trains
with the recorded thread count, and compares the sha256 of ``adapter_model.safetensors``; when they
differ it names the first tensor that differs and by how much.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from apa import artifacts, sisa, training
from apa.errors import ConfigError
from apa.hashing import sha256_file
from apa.model import BaseModel
from apa.runs import RunData, fit_adapter, read_run


@dataclass(frozen=True)
class Replay:
    adapter: int | str
    version: int
    published_sha256: str  # the manifest's adapter_sha256 (older manifests: the file's)
    file_sha256: str  # the weights file on disk
    replayed_sha256: str
    first_difference: str | None  # "<tensor>: max |diff| <x>" against the file, None when equal
    seconds: float
    trained_on: dict[str, str] | None  # training.cpu_identity() of the training (older manifests: None)
    replayed_on: dict[str, str]

    @property
    def equal(self) -> bool:
        return self.published_sha256 == self.file_sha256 == self.replayed_sha256

    def verdict(self) -> str:
        """"same bytes", or what differs and, where it ran on another CPU model, that it did."""
        if self.equal:
            return "same bytes"
        text = f"DIFFERENT: {self.first_difference or 'manifest sha256'}"
        if self.trained_on is None:
            return f"{text} (the manifest does not record its CPU; on another CPU model the last bits may differ)"
        if any(self.trained_on.get(k) != self.replayed_on.get(k) for k in CPU_KEYS):
            return (f"{text} (trained on {_cpu_label(self.trained_on)}, replayed on {_cpu_label(self.replayed_on)}:"
                    " across CPU models the last bits may differ; replay on the model it was trained on)")
        return text


CPU_KEYS = ("vendor", "family", "model", "capability")  # what picks the kernels' code paths


def _cpu_label(cpu: dict[str, str]) -> str:
    return f"{cpu.get('name', '?')} family {cpu.get('family', '?')} model {cpu.get('model', '?')}, " \
           f"{cpu.get('capability', '?')}"


def _samples(run: RunData, ids: list[str], split: str, manifest: dict[str, Any] | None = None) -> list[Any]:
    by_id = {s.sample_id: s for s in run.splits[split]}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ConfigError(f"the run folder lacks {len(missing)} {split} sample(s) the manifest names "
                          f"(e.g. {missing[0]}); a purged version cannot be replayed")
    if manifest is not None:
        content = {s["sample_id"]: s for s in manifest["samples"]}
        changed = [i for i in ids if by_id[i].content() != content.get(i)]
        if changed or set(content) != set(ids):
            raise ConfigError(f"the run's samples differ from the manifest's (e.g. {(changed or ['?'])[0]})")
    return [by_id[i] for i in ids]


def _first_difference(published: Path, replayed: Path) -> str | None:
    a, b = load_file(str(published)), load_file(str(replayed))
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            return f"{name}: only in the {'replay' if name in b else 'published version'}"
        if a[name].shape != b[name].shape or not torch.equal(a[name], b[name]):
            diff = (a[name].float() - b[name].float()).abs().max() if a[name].shape == b[name].shape else float("nan")
            return f"{name}: max |diff| {float(diff):.3g}"
    return None


def verify_version(run_dir: Path, base: BaseModel, adapter: int | str, version: int) -> Replay:
    """Replay ``adapter`` v``version`` of the run from its manifest and compare the weights."""
    import time

    run = read_run(run_dir)
    folder = artifacts.version_dir(run_dir, adapter, version)
    if not (folder / "manifest.json").is_file():
        raise ConfigError(f"{folder} is not an adapter version")
    doc = artifacts.read_json(folder / "manifest.json")
    if doc["base_model_sha256"] != base.sha256:
        raise ConfigError("the loaded base model is not the one this version was trained on")
    if training.TrainConfig.from_dict(doc["config"]) != run.config.train:
        raise ConfigError("the manifest's training config is not the run's")
    replay = doc.get("replay")
    if replay is None:  # written before manifests named their replay: training took the split's order
        ids = {s["sample_id"] for s in doc["samples"]}
        order = [s.sample_id for s in run.splits["train"] if s.sample_id in ids]
        selection = None
        threads = torch.get_num_threads()
    else:
        order, selection, threads = replay["order"], replay["selection"], int(replay["threads"])
    samples = _samples(run, order, "train", manifest=doc)
    if selection is None:
        raise ConfigError(f"{folder}: the manifest does not name the validation samples that chose its epoch; "
                          "it predates replayable manifests")
    select = _samples(run, selection, "valid")
    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _ = fit_adapter(run, base, adapter, samples, select, desc=f"replay {adapter} v{version}")
    finally:
        torch.set_num_threads(before)
    published = folder / training.ADAPTER_WEIGHTS
    with tempfile.TemporaryDirectory(prefix="apa-verify-") as tmp:
        training.save_adapter(model, Path(tmp))
        replayed = Path(tmp) / training.ADAPTER_WEIGHTS
        digest, on_disk = sha256_file(replayed), sha256_file(published)
        difference = None if digest == on_disk else _first_difference(published, replayed)
    return Replay(adapter=adapter, version=version, published_sha256=doc.get("adapter_sha256") or on_disk,
                  file_sha256=on_disk, replayed_sha256=digest, first_difference=difference,
                  seconds=round(time.perf_counter() - started, 1),
                  trained_on=None if replay is None else replay.get("cpu"), replayed_on=training.cpu_identity())


def all_versions(run_dir: Path) -> list[tuple[int | str, int]]:
    """Every adapter version on disk: the shards', then the baselines'."""
    run = read_run(run_dir)
    adapters: list[int | str] = [*range(run.config.shards), artifacts.SINGLE,
                                 *(sisa.adapter_id(k) for k in range(run.config.shards))]
    return [(a, v) for a in adapters for v in artifacts.versions(artifacts.shard_dir(run_dir, a))]
