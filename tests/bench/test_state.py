"""The quality benchmark's state folder: a run stopped mid-way, its work folder deleted (a new machine),
restored from the state folder and finished, gives the same numbers and adapters as a run never
stopped; a state file that does not match its recorded sha256 is refused."""

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from apa.faults import EXIT_CODE
from bench.quality import Config, predictions_path, run_config
from bench.state import RunState, StateError

TINY = Config("tiny", 2, 8, 8, 8, max_epochs=2, patience=2, dataset="handmade", min_history=1, batch_size=4)
COMPARED = ("auc", "ci95", "paired", "shards", "attention", "routing")


def adapter_bytes(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("adapter_model.safetensors"))}


def test_a_run_restored_from_its_state_folder_ends_as_one_never_stopped(
    tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    straight = run_config(TINY, tiny_home / "straight", "cpu", [])

    state, work = tmp_path / "state", tiny_home / "work"
    monkeypatch.setenv("APA_FAULT_POINT", "training.epoch-saved@3")  # shard 0 done, shard 1 killed after epoch 1
    with pytest.raises(subprocess.CalledProcessError) as killed:
        run_config(TINY, work, "cpu", [], state=state)
    assert killed.value.returncode == EXIT_CODE
    kinds = sorted(doc["kind"] for doc in RunState(state, work / "tiny").units.values())
    assert kinds == ["adapter", "checkpoint", "embeddings", "prepare"]
    assert (state / "adapters/shard-0/v1/adapter_model.safetensors").is_file()

    shutil.rmtree(work)  # the machine is gone; the state folder is all that is left
    monkeypatch.delenv("APA_FAULT_POINT")
    restored = RunState(state, work / "tiny").restore()
    [checkpoint] = (work / "tiny" / "cache" / "train").glob("1-*")
    assert f"cache/train/{checkpoint.name}" in restored and "adapters/shard-0/v1" in restored
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 1  # shard 1 goes on from epoch 2
    resumed = run_config(TINY, work, "cpu", [], state=state)

    for weights in ("per-sample", "per-user"):
        for key in COMPARED:
            assert resumed["eval"][weights][key] == straight["eval"][weights][key], (weights, key)
    assert adapter_bytes(work / "tiny") == adapter_bytes(tiny_home / "straight" / "tiny")
    table = pd.read_csv(predictions_path(work / "tiny" / "eval-per-sample.json"))
    pd.testing.assert_frame_equal(table, pd.read_csv(predictions_path(tiny_home / "straight" / "tiny" /
                                                                      "eval-per-sample.json")))
    units = RunState(state, work / "tiny").units
    assert not [u for u, doc in units.items() if doc["kind"] == "checkpoint"], "finished: no checkpoint kept"
    assert {"adapters/shard-1/v1", "single/v1", "sisa/shard-0/v1", "eval-per-sample.json"} <= set(units)
    assert resumed["state"]["units"]["adapter"] == 2 + 1 + 2

    # evaluating again rewrites a stale report from the cached passes, and the state folder takes it
    passes = sorted((work / "tiny" / "cache" / "eval").glob("*.json"))
    stale = work / "tiny" / "eval-per-sample.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "auc": {}}))
    again = run_config(TINY, work, "cpu", [], state=state, re_evaluate=True)
    assert again["eval"]["per-sample"]["auc"] == straight["eval"]["per-sample"]["auc"]
    assert sorted((work / "tiny" / "cache" / "eval").glob("*.json")) == passes  # no pass ran again
    assert json.loads((state / "eval-per-sample.json").read_text())["auc"] == again["eval"]["per-sample"]["auc"]

    # what the state folder holds is checked before anything is copied back
    shutil.rmtree(work)
    weights_file = state / "single/v1/adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(StateError, match="single/v1"):
        RunState(state, work / "tiny").restore()
    assert not work.exists()
