"""``apa verify``: a version retrained from its manifest alone has the published bytes; training twice in
two processes gives the same bytes; a changed weight or sample is found and named."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from apa import artifacts
from apa.artifacts import verify_command
from apa.errors import ConfigError
from apa.hashing import sha256_file
from apa.replay import all_versions, verify_version
from apa.training import cpu_identity
from tests.conftest import load_tiny

TRAIN = ["--shards", "2", "--train-samples", "8", "--valid-samples", "8", "--test-samples", "8", "--max-epochs", "2",
         "--min-history", "1", "--batch-size", "4", "--dataset", "handmade", "--no-ledger"]


def apa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600)


def weights(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("adapter_model.safetensors"))}


def test_two_processes_train_the_same_bytes_and_a_third_replays_them(tiny_home: Path) -> None:
    first, second = tiny_home / "runs" / "first", tiny_home / "runs" / "second"
    for run in (first, second):
        done = apa("train", *TRAIN, "--out", str(run))
        assert done.returncode == 0, done.stderr[-2000:]
    assert len(weights(first)) == 2 + 1 + 2 and weights(first) == weights(second)

    manifest = artifacts.read_json(artifacts.version_dir(first, 0, 1) / "manifest.json")
    replay = manifest["replay"]
    assert replay["threads"] >= 1 and replay["deterministic_algorithms"] is True
    assert sorted(replay["order"]) == sorted(s["sample_id"] for s in manifest["samples"])
    assert manifest["adapter_sha256"] == sha256_file(artifacts.version_dir(first, 0, 1) /
                                                     "adapter_model.safetensors")

    verified = apa("verify", str(first), "--all")
    assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
    assert verified.stdout.count("same bytes") == 5 and "verified 5 of 5" in verified.stdout


def test_a_changed_weight_is_named_and_fails(tiny_run_template: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_template / "runs" / "tiny", run)
    base = load_tiny(tiny_model_dir)
    assert [(a, v) for a, v in all_versions(run)] == [(0, 1), (1, 1), ("single", 1), ("sisa-0", 1), ("sisa-1", 1)]
    assert verify_version(run, base, 1, 1).equal

    path = artifacts.version_dir(run, 1, 1) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = verify_version(run, base, 1, 1)
    assert not result.equal and result.replayed_sha256 == result.published_sha256 != result.file_sha256
    assert result.first_difference == f"{name}: max |diff| 0.5"
    assert result.trained_on == result.replayed_on == cpu_identity()  # the template was trained here
    assert result.verdict() == f"DIFFERENT: {name}: max |diff| 0.5"
    elsewhere = replace(result, trained_on={**cpu_identity(), "family": "0", "name": "Elsewhere CPU"})
    assert "trained on Elsewhere CPU family 0" in elsewhere.verdict() and "last bits may differ" in elsewhere.verdict()
    assert "does not record its CPU" in replace(result, trained_on=None).verdict()
    assert replace(result, file_sha256=result.published_sha256, replayed_sha256=result.published_sha256,
                   trained_on=None).verdict() == "same bytes"
    assert verify_command(run, 1, 1) == f"apa verify {run} --shard 1 --version 1"
    assert verify_command(run, "single", 1) == f"apa verify {run} --adapter single --version 1"


def test_a_sample_that_is_not_the_manifests_cannot_be_replayed(tiny_run_template: Path, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_template / "runs" / "tiny", run)
    folder = artifacts.version_dir(run, 0, 1)
    doc = json.loads((folder / "manifest.json").read_text())
    doc["samples"][0]["label"] = 1 - doc["samples"][0]["label"]
    (folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="differ from the manifest"):
        verify_version(run, load_tiny(tiny_model_dir), 0, 1)
