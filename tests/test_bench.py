"""The benchmarks' own logic: sharing the single baseline, comparing report keys."""

import shutil
from dataclasses import replace
from pathlib import Path

from apa import artifacts
from apa.runs import train_run
from bench.quality import same_single, single_source, training_seconds
from bench.same_keys import key_paths
from tests.conftest import TINY_RUN, load_tiny


def test_runs_differing_only_in_partition_train_the_same_single(tiny_run_template: Path, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    donor = tiny_run_template / "runs" / "tiny"
    base = load_tiny(tiny_model_dir)
    dirs = {"datasets_dir": tiny_run_template / "datasets", "assets_dir": tiny_run_template / "assets"}
    other = tmp_path / "random"
    train_run(replace(TINY_RUN, partition="random"), other, base, **dirs)
    assert same_single(other, donor)
    # the claim behind sharing: trained again, it is byte for byte the donor's adapter
    weights = "v1/adapter_model.safetensors"
    assert ((artifacts.shard_dir(other, artifacts.SINGLE) / weights).read_bytes()
            == (artifacts.shard_dir(donor, artifacts.SINGLE) / weights).read_bytes())

    longer = tmp_path / "longer"
    train_run(replace(TINY_RUN, partition="random", train=replace(TINY_RUN.train, epochs=2)), longer, base,
              single=False, **dirs)
    assert not same_single(longer, donor)
    assert not same_single(donor, longer), "a run without a single adapter is no donor"

    # a copied single adapter is reported as the donor's, also when a resumed run finds it already there
    shutil.copytree(artifacts.shard_dir(donor, artifacts.SINGLE), artifacts.shard_dir(longer, artifacts.SINGLE))
    assert single_source(longer, [donor]) == donor
    assert single_source(donor, []) is None


def test_training_seconds_come_from_the_manifests(tiny_run_template: Path) -> None:
    run = tiny_run_template / "runs" / "tiny"
    seconds = training_seconds(run, TINY_RUN.shards)
    assert set(seconds) == {"0", "1", "single"}
    single = artifacts.read_json(artifacts.version_dir(run, artifacts.SINGLE, 1) / "manifest.json")
    assert seconds["single"] == single["training"]["seconds"] > 0


def test_key_paths_ignore_values_list_lengths_and_numbered_keys() -> None:
    full = {"per_k": {"1": {"r": 1.0}, "16": {"r": 2.0}}, "rows": [{"k": 1}, {"k": 16, "x": None}]}
    quick = {"per_k": {"2": {"r": 0.5}}, "rows": [{"k": 2, "x": 3}]}
    assert key_paths(quick) == key_paths(full)
    assert key_paths({**quick, "extra": 1}) != key_paths(full)
    assert key_paths({"per_k": {"2": {}}, "rows": []}) != key_paths(full)
