"""Merged adapters (apa/engines/merge.py) loaded in PEFT itself equal the torch engine's mixture (fp32)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apa.engines.base import AdapterRef, Mode, effective_weights
from apa.engines.merge import ShardAdapter, adapter_name, merged_tensors, purge_merged, snap_weights, write_merged
from apa.engines.torch import TorchEngine
from apa.errors import AdapterMismatch
from apa.model import BaseModel
from tests.support.adapters import K, R, make_adapter, peft_outputs, peft_reference, refs

TOL = 1e-4
MIX = [0.6, 0.3, 0.1]


@pytest.fixture(scope="session")
def shard_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return [make_adapter(tiny_model_dir, root / f"s{k}", seed=200 + k) for k in range(K)]


@pytest.fixture
def shards(shard_dirs: list[Path]) -> list[ShardAdapter]:
    return [ShardAdapter.read(ref) for ref in refs(shard_dirs)]


@pytest.fixture
def engine(tiny_base: BaseModel, shard_dirs: list[Path]) -> TorchEngine:
    eng = TorchEngine(tiny_base)
    eng.load(refs(shard_dirs))
    return eng


@pytest.fixture
def texts(dataset) -> list[str]:  # type: ignore[no-untyped-def]
    from apa.samples import build_samples

    return [s.prompt(dataset.titles) for s in build_samples(dataset)][:6]


def merged_p(tiny_model_dir: Path, folder: Path, texts: list[str]) -> np.ndarray:
    base, model = peft_reference(tiny_model_dir, folder)
    return peft_outputs(base, model, texts)[1]


@pytest.mark.parametrize("mode", ["nd", "d"])
def test_merged_adapter_in_peft_equals_the_engine(
    engine: TorchEngine, shards: list[ShardAdapter], tiny_model_dir: Path, texts: list[str], tmp_path: Path,
    mode: Mode,
) -> None:
    weights = np.array(MIX)
    folder = write_merged(shards, weights, mode, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == (K * R if mode == "nd" else R) and config["lora_alpha"] == config["r"]

    expected = engine.score(texts, np.tile(weights, (len(texts), 1)), mode=mode)
    np.testing.assert_allclose(merged_p(tiny_model_dir, folder, texts), expected, atol=TOL, rtol=0.0)
    # the mixture matters: one shard alone, or the other mode, is far from it
    other = engine.score(texts, np.tile(weights, (len(texts), 1)), mode="d" if mode == "nd" else "nd")
    alone = engine.score(texts, np.eye(K)[[0] * len(texts)], mode=mode)
    assert np.abs(other - expected).max() > 10 * TOL and np.abs(alone - expected).max() > 10 * TOL


@pytest.mark.parametrize("mode", ["nd", "d"])
def test_merge_after_quarantine_uses_the_effective_weights_and_leaves_the_shard_out(
    engine: TorchEngine, shards: list[ShardAdapter], tiny_model_dir: Path, texts: list[str], tmp_path: Path,
    mode: Mode,
) -> None:
    engine.quarantine(1)
    weights = np.array(MIX)
    effective = effective_weights(weights[None, :], frozenset({0, 2}))[0]
    np.testing.assert_allclose(effective, [0.6 / 0.7, 0.0, 0.1 / 0.7])
    rank, tensors = merged_tensors(shards, effective, mode)
    assert rank == (2 * R if mode == "nd" else R)
    if mode == "nd":  # exactly shards 0 and 2's A blocks, in order; nothing of shard 1
        name = next(iter(shards[0].modules))
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        torch.testing.assert_close(a, torch.cat([shards[0].modules[name][0], shards[2].modules[name][0]]))

    folder = write_merged(shards, effective, mode, tmp_path)
    expected = engine.score(texts, np.tile(weights, (len(texts), 1)), mode=mode)  # the engine renormalises
    np.testing.assert_allclose(merged_p(tiny_model_dir, folder, texts), expected, atol=TOL, rtol=0.0)


def test_names_are_content_addressed(shards: list[ShardAdapter], shard_dirs: list[Path], tmp_path: Path) -> None:
    w = np.array(MIX)
    name = adapter_name(shards, w, "nd")
    assert name == adapter_name(shards, w.copy(), "nd")
    assert name.startswith("apa-nd-")
    assert len({name, adapter_name(shards, w, "d"), adapter_name(shards, np.array([0.5, 0.4, 0.1]), "nd")}) == 3
    newer = [*shards[:2], ShardAdapter.read(AdapterRef(shard=2, version=2, path=shard_dirs[2]))]
    assert adapter_name(newer, w, "nd") != name  # another version of a shard: another name
    other = [*shards[:2], ShardAdapter.read(AdapterRef(shard=2, version=1, path=shard_dirs[0]))]
    assert adapter_name(other, w, "nd") != name  # same (shard, version), other tensors: another name
    first = write_merged(shards, w, "nd", tmp_path)
    assert first.name == name and write_merged(shards, w, "nd", tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary folder left behind


def test_snap_weights_by_hand() -> None:
    np.testing.assert_allclose(snap_weights(np.array([0.6, 0.3, 0.1]), 0.25), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(snap_weights(np.array([1 / 3] * 3), 0.1), [0.4, 0.3, 0.3])
    np.testing.assert_allclose(snap_weights(np.array([0.7, 0.0, 0.3]), 0.5), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(snap_weights(np.array([0.123, 0.877]), 0.0), [0.123, 0.877])
    for _ in range(20):
        w = np.random.dirichlet(np.ones(4))
        snapped = snap_weights(w, 0.01)
        assert snapped.sum() == pytest.approx(1.0) and np.abs(snapped - w).max() < 0.01
    with pytest.raises(AdapterMismatch):
        snap_weights(np.array([0.5, 0.5]), 0.3)


def test_merge_refuses_empty_or_mismatched_weights(shards: list[ShardAdapter]) -> None:
    with pytest.raises(AdapterMismatch):
        merged_tensors(shards, np.zeros(K), "nd")
    with pytest.raises(AdapterMismatch):
        merged_tensors(shards, np.array([1.0]), "nd")


def test_purge_deletes_merged_adapters_of_versions_no_longer_live(
    shards: list[ShardAdapter], shard_dirs: list[Path], tmp_path: Path,
) -> None:
    old = write_merged(shards, np.array(MIX), "nd", tmp_path)
    clean = write_merged(shards, np.array([0.5, 0.0, 0.5]), "nd", tmp_path)  # holds no shard 1
    broken = tmp_path / "apa-nd-000000000000000000000000"
    broken.mkdir()  # no provenance: nothing vouches for it
    retrained = ShardAdapter.read(AdapterRef(shard=1, version=2, path=shard_dirs[0]))
    live = {shards[0].sha256, retrained.sha256, shards[2].sha256}
    assert sorted(purge_merged(tmp_path, live)) == sorted([old.name, broken.name])
    assert [p.name for p in tmp_path.iterdir()] == [clean.name]
    assert json.loads((clean / "apa_merge.json").read_text())["shards"] == [
        {"shard": 0, "version": 1, "sha256": shards[0].sha256, "weight": 0.5},
        {"shard": 2, "version": 1, "sha256": shards[2].sha256, "weight": 0.5}]
