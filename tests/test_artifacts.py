"""Immutable adapter versions and training manifests."""

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from apa import artifacts
from apa.data import Dataset
from apa.errors import RunNotFound
from apa.hashing import canonical_json, sha256_json
from apa.samples import build_samples

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _fill(text: str) -> Callable[[Path], None]:
    def fill(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_text(text)

    return fill


def test_manifest_hash_is_sha256_of_canonical_json(dataset: Dataset) -> None:
    samples = build_samples(dataset)[:5]
    shuffled = [samples[i] for i in (3, 0, 4, 2, 1)]
    doc = artifacts.manifest(shard=1, samples=shuffled, config=CONFIG, seed=42, base_model_sha256="ab" * 32)

    ordered = sorted(samples, key=lambda s: s.sample_id)
    expected_content = {
        "samples": [
            {"sample_id": s.sample_id, "user_id": s.user_id, "target_item_id": s.target_item_id,
             "label": s.label, "history_item_ids": list(s.history_item_ids),
             "history_liked": list(s.history_liked), "interaction_keys": list(s.interaction_keys)}
            for s in ordered
        ],
        "config": CONFIG,
        "seed": 42,
        "base_model_sha256": "ab" * 32,
    }
    text = json.dumps(expected_content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert ", " not in text and ": " not in text  # no spaces after separators
    assert doc["manifest_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert doc["manifest_sha256"] == sha256_json(expected_content)
    assert canonical_json(expected_content) == text
    assert doc["n_samples"] == 5
    assert doc["shard"] == 1
    assert [s["sample_id"] for s in doc["samples"]] == [s.sample_id for s in ordered]

    # order of the input does not matter; any content change does
    same = artifacts.manifest(shard=1, samples=samples, config=CONFIG, seed=42, base_model_sha256="ab" * 32)
    assert same["manifest_sha256"] == doc["manifest_sha256"]
    for changed in (
        artifacts.manifest(shard=1, samples=samples[:4], config=CONFIG, seed=42, base_model_sha256="ab" * 32),
        artifacts.manifest(shard=1, samples=samples, config={**CONFIG, "r": 4}, seed=42,
                           base_model_sha256="ab" * 32),
        artifacts.manifest(shard=1, samples=samples, config=CONFIG, seed=43, base_model_sha256="ab" * 32),
        artifacts.manifest(shard=1, samples=samples, config=CONFIG, seed=42, base_model_sha256="cd" * 32),
    ):
        assert changed["manifest_sha256"] != doc["manifest_sha256"]


def test_write_version_numbers_and_never_overwrites(tmp_path: Path) -> None:
    doc = {"manifest_sha256": "x"}
    assert artifacts.latest_version(tmp_path, 0) is None
    v1, p1 = artifacts.write_version(tmp_path, 0, _fill("one"), doc)
    v2, p2 = artifacts.write_version(tmp_path, 0, _fill("two"), doc)
    assert (v1, v2) == (1, 2)
    assert p1 == tmp_path / "adapters" / "shard-0" / "v1"
    assert p2 == artifacts.version_dir(tmp_path, 0, 2)
    assert (p1 / "adapter_model.safetensors").read_text() == "one"
    assert (p2 / "adapter_model.safetensors").read_text() == "two"
    manifest = artifacts.read_json(p2 / "manifest.json")
    assert manifest["version"] == 2
    assert manifest["manifest_sha256"] == "x"
    assert "created_at" in manifest
    assert artifacts.latest_version(tmp_path, 0) == 2
    assert artifacts.versions(artifacts.shard_dir(tmp_path, 0)) == [1, 2]
    assert list(artifacts.shard_dir(tmp_path, 0).glob(".tmp-*")) == []

    single, path = artifacts.write_version(tmp_path, artifacts.SINGLE, _fill("s"), doc)
    assert (single, path) == (1, tmp_path / "single" / "v1")


def test_write_version_failure_leaves_nothing(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        artifacts.write_version(tmp_path, 3, broken, {})
    parent = artifacts.shard_dir(tmp_path, 3)
    assert list(parent.iterdir()) == []
    assert artifacts.latest_version(tmp_path, 3) is None


def test_write_version_skips_a_number_taken_meanwhile(tmp_path: Path) -> None:
    parent = artifacts.shard_dir(tmp_path, 0)

    def racing_fill(folder: Path) -> None:
        (folder / "mine").write_text("mine")
        (parent / "v1").mkdir()  # another writer renamed its v1 into place first
        (parent / "v1" / "theirs").write_text("theirs")

    version, path = artifacts.write_version(tmp_path, 0, racing_fill, {})
    assert version == 2
    assert (path / "mine").read_text() == "mine"
    assert (parent / "v1" / "theirs").read_text() == "theirs"
    assert not (parent / "v1" / "mine").exists()


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        version, _ = artifacts.write_version(tmp_path, 0, _fill(str(i)), {})
        with lock:
            results.append(version)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == list(range(1, 9))
    contents = {(artifacts.version_dir(tmp_path, 0, v) / "adapter_model.safetensors").read_text() for v in results}
    assert contents == {str(i) for i in range(8)}


def test_clean_temp(tmp_path: Path) -> None:
    artifacts.write_version(tmp_path, 0, _fill("keep"), {})
    artifacts.write_json_atomic(tmp_path / "run.json", {"kept": True})
    leftovers = [artifacts.shard_dir(tmp_path, 0) / ".tmp-abc", artifacts.shard_dir(tmp_path, 1) / ".tmp-def"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text("half")
    half_written = tmp_path / ".tmp-x1y2.parquet"  # a rewrite killed before its rename
    half_written.write_text("half")
    leftovers.append(half_written)
    fresh = artifacts.shard_dir(tmp_path, 0) / ".tmp-live"  # a writer still copying its files in
    fresh.mkdir()
    for path in leftovers:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert artifacts.unchanged_for(artifacts.temp_paths(tmp_path), 60) == [half_written, *leftovers[:2]]
    assert artifacts.clean_temp(tmp_path) == 3
    assert not any(path.exists() for path in leftovers)
    assert fresh.is_dir()
    assert (artifacts.version_dir(tmp_path, 0, 1) / "adapter_model.safetensors").read_text() == "keep"
    assert artifacts.read_json(tmp_path / "run.json") == {"kept": True}
    assert artifacts.clean_temp(tmp_path) == 0
    assert artifacts.clean_temp(tmp_path, older_than_s=-1) == 1


def test_write_json_atomic_and_runs(tmp_path: Path) -> None:
    artifacts.write_json_atomic(tmp_path / "runs" / "b" / "run.json", {"é": 1})
    artifacts.write_json_atomic(tmp_path / "runs" / "a" / "run.json", {"x": 2})
    (tmp_path / "runs" / "c").mkdir()  # no run.json: not a run
    assert artifacts.read_json(tmp_path / "runs" / "b" / "run.json") == {"é": 1}
    assert list((tmp_path / "runs" / "b").iterdir()) == [tmp_path / "runs" / "b" / "run.json"]
    assert artifacts.newest_run(tmp_path / "runs") == tmp_path / "runs" / "b"
    assert artifacts.require_run(tmp_path / "runs" / "a") == tmp_path / "runs" / "a"
    with pytest.raises(RunNotFound):
        artifacts.require_run(tmp_path / "runs" / "c")
    with pytest.raises(RunNotFound):
        artifacts.newest_run(tmp_path / "nothing")


def test_replace_dir_leaves_one_whole_folder_wherever_it_stops(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while filling: the old folder stays, only a temp folder beside it. Killed between the two
    renames: no folder in place, the old one aside, and ``recover_dir`` puts it back. Killed after both: a
    leftover old folder, which ``recover_dir`` (and the next write) removes."""
    folder = tmp_path / "state"

    def text(value: str) -> Callable[[Path], None]:
        return lambda tmp: (tmp / "f").write_text(value)

    artifacts.replace_dir(folder, text("one"))
    with pytest.raises(OSError, match="killed"):
        artifacts.replace_dir(folder, lambda tmp: (_ for _ in ()).throw(OSError("killed")))
    assert (folder / "f").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["state"]

    real = os.replace
    calls = []

    def second_rename_dies(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed between the renames")
        real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", second_rename_dies)
    with pytest.raises(OSError, match="between"):
        artifacts.replace_dir(folder, text("two"))
    monkeypatch.setattr(artifacts.os, "replace", real)
    assert not folder.exists() and (tmp_path / ".old-state").is_dir()
    assert (artifacts.recover_dir(folder) / "f").read_text() == "one"

    (tmp_path / ".old-state").mkdir()  # died after both renames, before removing the old one
    assert (artifacts.recover_dir(folder) / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    artifacts.replace_dir(folder, text("three"))
    assert (folder / "f").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["state"]
