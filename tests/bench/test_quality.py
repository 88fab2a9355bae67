"""The benchmarks' own logic: sharing baselines between runs, comparing report keys."""

from dataclasses import replace
from pathlib import Path

from apa import artifacts, sisa
from apa.runs import read_run, train_run
from bench.quality import adapter_seconds, donor_version
from bench.same_keys import key_paths
from tests.conftest import TINY_RUN, load_tiny


def test_a_donor_baseline_is_found_only_when_it_is_the_same_adapter(tiny_run_template: Path, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    donor = tiny_run_template / "runs" / "tiny"
    base = load_tiny(tiny_model_dir)
    dirs = {"datasets_dir": tiny_run_template / "datasets", "assets_dir": tiny_run_template / "assets"}
    other = tmp_path / "random"
    train_run(replace(TINY_RUN, partition="random"), other, base, single=False, **dirs)
    # another partition trains the same single adapter, and a random run's shard k is SISA's shard k
    assert donor_version(other, artifacts.SINGLE, [donor]) == artifacts.version_dir(donor, artifacts.SINGLE, 1)
    assert donor_version(donor, sisa.adapter_id(1), [other]) == artifacts.version_dir(other, 1, 1)
    # the claim behind sharing: trained again, it is byte for byte the donor's adapter
    train_run(replace(TINY_RUN, partition="random"), other, base, **dirs)
    weights = "v1/adapter_model.safetensors"
    assert ((artifacts.shard_dir(other, artifacts.SINGLE) / weights).read_bytes()
            == (artifacts.shard_dir(donor, artifacts.SINGLE) / weights).read_bytes())
    assert ((artifacts.shard_dir(other, 1) / weights).read_bytes()
            == (artifacts.shard_dir(donor, sisa.adapter_id(1)) / weights).read_bytes())

    longer = tmp_path / "longer"
    train_run(replace(TINY_RUN, train=replace(TINY_RUN.train, max_epochs=2)), longer, base, single=False,
              with_sisa=False, **dirs)
    assert donor_version(longer, artifacts.SINGLE, [donor]) is None, "another training config"
    assert donor_version(longer, sisa.adapter_id(0), [donor, other]) is None
    assert donor_version(donor, artifacts.SINGLE, [longer]) is None, "a run without a single adapter is no donor"


def test_adapter_seconds_come_from_the_manifests(tiny_run_template: Path) -> None:
    run = tiny_run_template / "runs" / "tiny"
    seconds = adapter_seconds(run, read_run(run))
    assert set(seconds) == {"0", "1", "single", "sisa-0", "sisa-1"}
    single = artifacts.read_json(artifacts.version_dir(run, artifacts.SINGLE, 1) / "manifest.json")
    assert seconds["single"]["train_s"] == single["training"]["seconds"] > 0
    assert seconds["single"]["epoch_kept"] == 1 and seconds["single"]["n_samples"] == TINY_RUN.n_train


def test_key_paths_ignore_values_list_lengths_and_numbered_keys() -> None:
    full = {"per_k": {"1": {"r": 1.0}, "16": {"r": 2.0}}, "rows": [{"k": 1}, {"k": 16, "x": None}]}
    quick = {"per_k": {"2": {"r": 0.5}}, "rows": [{"k": 2, "x": 3}]}
    assert key_paths(quick) == key_paths(full)
    assert key_paths({**quick, "extra": 1}) != key_paths(full)
    assert key_paths({"per_k": {"2": {}}, "rows": []}) != key_paths(full)


def test_serving_load_counts_latencies_candidates_and_errors() -> None:
    import os
    from typing import Any

    from bench.serving import load, peak_rss_mb

    class Stub:
        def recommend(self, user_id: str, top_k: int) -> dict[str, Any]:
            if user_id == "down":
                raise RuntimeError("503")
            return {"fallback": user_id == "fallback", "items": [{"item_id": str(i)} for i in range(20)]}

    report = load(Stub(), ["a", "b", "down", "fallback"], concurrency=2, timeout_s=10)  # type: ignore[arg-type]
    assert report["requests"] == 4 and report["errors"] == 2 and report["candidates_scored"] == 40
    assert report["error_examples"][0].startswith("RuntimeError")
    assert set(report) >= {"p50_s", "p99_s", "wall_s", "candidates_per_s"}
    assert (peak_rss_mb(os.getpid()) or 0) > 10
