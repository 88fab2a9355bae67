"""End to end on the tiny model: ``train_run`` then ``evaluate``; and ``apa data import`` via the CLI."""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from apa import artifacts, data, sisa, training
from apa.aggregation import PAPER, AttentionGrid, choose_attention
from apa.errors import ConfigError
from apa.evaluation import METHODS, evaluate, load_memory, recompute_auc, serving_refs
from apa.integrity import check_run
from apa.model import BaseModel
from apa.runs import RunConfig, RunData, memory_path, read_run, train_run
from apa.selection import selection_samples, valid_clusters
from apa.settings import get_settings
from cli.main import app
from tests.conftest import TINY_RUN, TITLES, load_tiny, raw_frames

K = 2
CONFIG = TINY_RUN


@dataclasses.dataclass
class TrainedRun:
    run_dir: Path
    datasets_dir: Path
    assets_dir: Path
    base: BaseModel
    run: RunData


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    home = tmp_path_factory.mktemp("home")
    datasets_dir, assets_dir = home / "datasets", home / "assets"
    interactions, items = raw_frames()
    data.save(data.normalise(interactions, items, source="handmade"), datasets_dir, "handmade")
    base = load_tiny(tiny_model_dir)
    run_dir = home / "runs" / "r1"
    run = train_run(CONFIG, run_dir, base, datasets_dir=datasets_dir, assets_dir=assets_dir)
    return TrainedRun(run_dir=run_dir, datasets_dir=datasets_dir, assets_dir=assets_dir, base=base, run=run)


def _manifest(run_dir: Path, shard: int | str, version: int = 1) -> dict:
    return artifacts.read_json(artifacts.version_dir(run_dir, shard, version) / "manifest.json")


ADAPTERS: list[int | str] = [*range(K), artifacts.SINGLE, *(sisa.adapter_id(k) for k in range(K))]
ONE_EACH = {str(a): [1] for a in ADAPTERS}


def _all_versions(run_dir: Path) -> dict[str, list[int]]:
    return {str(s): artifacts.versions(artifacts.shard_dir(run_dir, s)) for s in ADAPTERS}


def test_run_folder_layout(trained: TrainedRun) -> None:
    run_dir = trained.run_dir
    doc = artifacts.read_json(run_dir / "run.json")
    assert doc["config"] == CONFIG.as_dict()
    assert doc["base_model"]["sha256"] == trained.base.sha256
    assert doc["shard_sizes"] == [4, 4]
    assert len(doc["centres"]) == K
    assert (run_dir / "samples.parquet").is_file()
    assert (run_dir / "memory" / "valid.npz").is_file()
    assert _all_versions(run_dir) == ONE_EACH
    assert list(run_dir.glob("**/.tmp-*")) == []
    assert read_run(run_dir).splits == trained.run.splits
    assert [len(trained.run.splits[s]) for s in ("train", "valid", "test")] == [8, 8, 8]


def test_shard_manifests_partition_the_train_split(trained: TrainedRun) -> None:
    run = trained.run
    train_ids = {s.sample_id for s in run.splits["train"]}
    seen: set[str] = set()
    for shard in range(K):
        doc = _manifest(trained.run_dir, shard)
        ids = {s["sample_id"] for s in doc["samples"]}
        assert ids.isdisjoint(seen)
        seen |= ids
        assert ids == {s.sample_id for s in run.shard_samples(shard)}
        assert doc["n_samples"] == len(ids)
        assert doc["seed"] == training.derive_seed(CONFIG.seed, shard)
        assert doc["config"] == CONFIG.train.as_dict()
        assert doc["base_model_sha256"] == trained.base.sha256
        expected = artifacts.manifest(shard=shard, samples=run.shard_samples(shard), config=CONFIG.train.as_dict(),
                                      seed=doc["seed"], base_model_sha256=trained.base.sha256)
        assert doc["manifest_sha256"] == expected["manifest_sha256"]
        assert doc["training"]["steps"] == 1  # 4 samples, batch 4, 1 epoch
    assert seen == train_ids
    single = _manifest(trained.run_dir, artifacts.SINGLE)
    assert {s["sample_id"] for s in single["samples"]} == train_ids
    assert single["training"]["steps"] == 2


def test_adapters_load_in_peft_and_match_their_stored_predictions(trained: TrainedRun, tiny_model_dir: Path) -> None:
    from peft import PeftModel

    run = trained.run
    valid = run.splits["valid"]
    for adapter in ADAPTERS:
        folder = artifacts.version_dir(trained.run_dir, adapter, 1)
        base = load_tiny(tiny_model_dir)
        model = PeftModel.from_pretrained(base.model, str(folder))
        model.eval()
        config: Any = model.peft_config["default"]
        assert sorted(config.target_modules) == ["q_proj", "v_proj"]
        assert config.r == 4
        stored = artifacts.read_json(folder / "valid_predictions.json")
        assert list(stored) == [s.sample_id for s in valid]
        fresh = training.predict(base, model, [run.prompts[s.sample_id] for s in valid], batch_size=4)
        np.testing.assert_allclose([stored[s.sample_id] for s in valid], fresh, atol=1e-5, rtol=0.0)


def test_sisa_shards_are_a_random_partition_of_the_same_samples(trained: TrainedRun) -> None:
    from apa.partition import random_split

    run = trained.run
    train = run.splits["train"]
    expected = random_split(train, np.zeros((len(train), 0)), K, CONFIG.seed).assignment
    semantic = [run.shard_of[s.sample_id] for s in train]
    seen: set[str] = set()
    for k in range(K):
        doc = _manifest(trained.run_dir, sisa.adapter_id(k))
        ids = {s["sample_id"] for s in doc["samples"]}
        assert ids == {s.sample_id for s, shard in zip(train, expected, strict=True) if shard == k}
        assert ids.isdisjoint(seen)
        seen |= ids
        assert doc["seed"] == training.derive_seed(CONFIG.seed, k)  # what a random-partition run's shard k uses
    assert seen == {s.sample_id for s in train}
    assert list(expected) != semantic  # not the semantic shards again


def test_a_random_partition_run_is_its_own_sisa(trained: TrainedRun, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CONFIG, partition="random")
    run = train_run(cfg, tmp_path / "run", trained.base, datasets_dir=trained.datasets_dir,
                    assets_dir=trained.assets_dir, single=False)
    assert run.own_sisa()
    assert not (tmp_path / "run" / sisa.NAME).exists()
    for k in range(K):  # the same samples, config and seed as the semantic run's SISA shard k
        assert _manifest(tmp_path / "run", k)["manifest_sha256"] == \
            _manifest(trained.run_dir, sisa.adapter_id(k))["manifest_sha256"]
    report, _ = evaluate(tmp_path / "run", trained.base, batch_size=4)
    assert report["auc"]["sisa"] == report["auc"]["avg_semantic"]  # the same K passes, averaged


def test_evaluate_reports_every_method_with_intervals(trained: TrainedRun) -> None:
    report, table = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200)
    assert set(report["auc"]) == set(METHODS) == set(report["ci95"])
    for method, value in report["auc"].items():
        low, high = report["ci95"][method]
        assert 0.0 <= low <= high <= 1.0, method
        assert 0.0 <= value <= 1.0, method
    assert set(report["paired"]) == {"apa_nd-single", "apa_nd-sisa", "apa_nd-best_shard", "apa_nd-avg_semantic",
                                     "apa_nd-apa_nd_paper"}
    assert report["config"]["n_test"] == 8
    assert report["shards"]["versions"] == [1, 1]
    assert sum(report["routing"]["chosen"]["mean_weights"]) == pytest.approx(1.0, abs=1e-3)
    # the per-sample table: one row per test sample, the AUCs recompute from it
    assert list(table["sample_id"]) == [s.sample_id for s in trained.run.splits["test"]]
    assert recompute_auc(table, list(METHODS)) == report["auc"]
    np.testing.assert_allclose(table[[f"w_{k}" for k in range(K)]].sum(axis=1), 1.0, atol=1e-9)
    per_user, _ = evaluate(trained.run_dir, trained.base, weights_mode="per-user", batch_size=4, resamples=200)
    assert set(per_user["auc"]) == set(METHODS)
    assert per_user["auc"]["base"] == report["auc"]["base"]


def test_evaluate_chooses_the_attention_on_validation_and_reports_the_papers(trained: TrainedRun) -> None:
    memory = load_memory(trained.run_dir, serving_refs(trained.run_dir, K))
    choice = choose_attention(memory)
    report, _ = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200)
    assert report["attention"]["chosen"] == choice.as_dict()
    assert report["attention"]["paper"]["error"] == PAPER.error and report["attention"]["paper"]["tau"] == PAPER.tau
    # a grid of one is a fixed attention: the paper's gives apa_nd == apa_nd_paper
    fixed, _ = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200,
                        grid=AttentionGrid((PAPER.error,), (PAPER.knn,), (PAPER.tau,)))
    assert fixed["auc"]["apa_nd"] == fixed["auc"]["apa_nd_paper"] == report["auc"]["apa_nd_paper"]
    assert fixed["paired"]["apa_nd-apa_nd_paper"] == [0.0, 0.0, 0.0]


def test_no_attention_choice_looks_at_test_labels(trained: TrainedRun, tmp_path: Path) -> None:
    import pandas as pd

    report, table = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200)
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    frame = pd.read_parquet(copy / "samples.parquet")
    test = frame["split"] == "test"
    frame.loc[test, "label"] = 1 - frame.loc[test, "label"].to_numpy()[::-1]  # flipped and reversed
    frame.to_parquet(copy / "samples.parquet", index=False)
    permuted, permuted_table = evaluate(copy, trained.base, batch_size=4, resamples=200)
    assert list(permuted_table["label"]) != list(table["label"])
    assert permuted["attention"] == report["attention"]
    weights = [c for c in table.columns if c.startswith("w_")]
    assert weights and permuted_table[weights].equals(table[weights])
    assert permuted["shards"]["best_shard"] == report["shards"]["best_shard"]  # picked on validation too


def test_shards_are_judged_on_their_cluster_and_baselines_on_all(trained: TrainedRun) -> None:
    run, valid = trained.run, trained.run.splits["valid"]
    clusters = valid_clusters(memory_path(trained.run_dir), run.centres)
    assert set(clusters) == {s.sample_id for s in valid} and set(clusters.values()) <= set(range(K))
    for adapter in ADAPTERS:
        chosen, on = selection_samples(memory_path(trained.run_dir), run.centres, adapter, valid)
        if on == "cluster":
            assert isinstance(adapter, int)
            assert {s.sample_id for s in chosen} == {i for i, c in clusters.items() if c == adapter}
        else:
            assert chosen == valid
        doc = _manifest(trained.run_dir, adapter)["training"]
        assert doc["selection"] == {"on": on, "samples": len(chosen)}
        assert doc["epoch_kept"] == 1 and doc["curve"][0]["epoch"] == 1
    # a cluster without two samples of each label is no judge: its shard falls back to all
    one_label = [s for s in valid if s.label == 1]
    assert selection_samples(memory_path(trained.run_dir), run.centres, 0, one_label)[1] == "all"


def test_samples_carry_ten_earlier_items_by_default(dataset: data.Dataset) -> None:
    from apa.samples import build_samples

    assert RunConfig().min_history == 10
    assert build_samples(dataset, min_history=RunConfig().min_history) == []  # the hand-made users have < 11
    assert all(len(s.history_item_ids) >= 5 for s in build_samples(dataset, min_history=5))


def test_evaluate_reads_finished_passes_back(trained: TrainedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200)
    assert list((trained.run_dir / "cache" / "eval").glob("*.json"))

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached pass ran again")

    monkeypatch.setattr("apa.evaluation.TorchEngine.score", no_forward)
    again, _ = evaluate(trained.run_dir, trained.base, batch_size=4, resamples=200)
    assert again["auc"] == first["auc"]
    passes = set(METHODS) - {"base", "item_mean"}  # base is read off the embedding pass, timed each time
    assert {m: again["seconds"][m] for m in passes} == {m: first["seconds"][m] for m in passes}


def test_resume_trains_nothing_new(trained: TrainedRun) -> None:
    before = {p: p.stat().st_mtime_ns for p in trained.run_dir.glob("**/manifest.json")}
    again = train_run(CONFIG, trained.run_dir, trained.base, datasets_dir=trained.datasets_dir,
                      assets_dir=trained.assets_dir)
    assert _all_versions(trained.run_dir) == ONE_EACH
    assert {p: p.stat().st_mtime_ns for p in trained.run_dir.glob("**/manifest.json")} == before
    assert again.shard_of == trained.run.shard_of


def test_resume_trains_only_the_missing_shard(trained: TrainedRun, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    shutil.rmtree(artifacts.shard_dir(copy, 1))
    crashed = artifacts.shard_dir(copy, 0) / ".tmp-crashed"  # left by a writer killed an hour ago
    crashed.mkdir()
    os.utime(crashed, (time.time() - 3600, time.time() - 3600))
    kept = (artifacts.version_dir(copy, 0, 1) / "manifest.json").read_text()
    train_run(CONFIG, copy, trained.base, datasets_dir=trained.datasets_dir, assets_dir=trained.assets_dir)
    assert _all_versions(copy) == ONE_EACH
    assert (artifacts.version_dir(copy, 0, 1) / "manifest.json").read_text() == kept
    assert not (artifacts.shard_dir(copy, 0) / ".tmp-crashed").exists()
    retrained = _manifest(copy, 1)
    assert retrained["manifest_sha256"] == _manifest(trained.run_dir, 1)["manifest_sha256"]


def test_other_config_or_base_on_the_same_folder_is_refused(trained: TrainedRun) -> None:
    for changed in (dataclasses.replace(CONFIG, seed=1), dataclasses.replace(CONFIG, shards=3),
                    dataclasses.replace(CONFIG, train=training.TrainConfig(r=4, max_epochs=2, batch_size=4))):
        with pytest.raises(ConfigError, match="another configuration"):
            train_run(changed, trained.run_dir, trained.base, datasets_dir=trained.datasets_dir,
                      assets_dir=trained.assets_dir)
    other_base = dataclasses.replace(trained.base, sha256="0" * 64)
    with pytest.raises(ConfigError, match="another base model"):
        train_run(CONFIG, trained.run_dir, other_base, datasets_dir=trained.datasets_dir,
                  assets_dir=trained.assets_dir)
    with pytest.raises(ConfigError):
        evaluate(trained.run_dir, other_base)
    assert _all_versions(trained.run_dir) == ONE_EACH


def test_user_partition_run_without_single(trained: TrainedRun, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CONFIG, partition="user", seed=3)  # seed 3: train spans all four users
    run = train_run(cfg, tmp_path / "run", trained.base, datasets_dir=trained.datasets_dir,
                    assets_dir=trained.assets_dir, single=False)
    shards_of_user: dict[str, set[int]] = {}
    for sample in run.splits["train"]:
        shards_of_user.setdefault(sample.user_id, set()).add(run.shard_of[sample.sample_id])
    assert all(len(s) == 1 for s in shards_of_user.values())
    assert artifacts.latest_version(tmp_path / "run", artifacts.SINGLE) is None
    report, _ = evaluate(tmp_path / "run", trained.base, batch_size=4, resamples=200)
    assert set(report["auc"]) == set(METHODS) - {"single"}


# -- apa data import ---------------------------------------------------------------------------------

@pytest.fixture
def apa_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("APA_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_cli_import_movielens_format(apa_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "ml-tiny"
    source.mkdir()
    (source / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t1\t881250951\n")
    (source / "u.item").write_bytes(
        "10|Misérables, Les (1995)|01-Jan-1995||http://x|0|1\n20|Heat (1995)|01-Jan-1995||http://y|1|0\n"
        .encode("latin-1")
    )
    result = _invoke("data", "import", str(source))
    assert result.exit_code == 0, result.output
    assert "imported 3 interactions, 2 items, 2 users" in result.stdout
    imported = data.load("ml-tiny", datasets_dir=apa_home / "datasets", assets_dir=apa_home / "assets")
    assert imported.interactions["user_id"].tolist() == ["1", "1", "2"]
    assert imported.interactions["item_id"].tolist() == ["10", "20", "10"]
    assert imported.interactions["rating"].tolist() == [5.0, 3.0, 1.0]
    assert imported.interactions["timestamp"].tolist() == [881250949, 881250950, 881250951]
    assert imported.titles == {"10": "Misérables, Les (1995)", "20": "Heat (1995)"}


def test_cli_import_csv_with_a_name(apa_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "export"
    source.mkdir()
    interactions, items = raw_frames()
    interactions.sample(frac=1.0, random_state=0).to_csv(source / "interactions.csv", index=False)
    items.to_csv(source / "items.csv", index=False)
    result = _invoke("data", "import", str(source), "--name", "shop")
    assert result.exit_code == 0, result.output
    assert f"imported {len(interactions)} interactions, {len(TITLES)} items, 4 users" in result.stdout
    imported = data.load("shop", datasets_dir=apa_home / "datasets", assets_dir=apa_home / "assets")
    expected = data.normalise(interactions, items, source="shop")
    for column in ("user_id", "item_id", "rating", "timestamp"):
        assert imported.interactions[column].tolist() == expected.interactions[column].tolist()
    assert imported.titles == TITLES


def test_cli_import_csv_keeps_ids_as_text(apa_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "padded"
    source.mkdir()
    (source / "interactions.csv").write_text(
        "user_id,item_id,rating,timestamp\n007,0042,5,1\n7,43,2,2\n007,43,4,3\n"
    )
    (source / "items.csv").write_text("item_id,title\n0042,Heat (1995)\n43,1984\n")
    result = _invoke("data", "import", str(source))
    assert result.exit_code == 0, result.output
    assert "3 interactions, 2 items, 2 users" in result.stdout  # "007" and "7" are two users
    imported = data.load("padded", datasets_dir=apa_home / "datasets", assets_dir=apa_home / "assets")
    assert imported.interactions["user_id"].tolist() == ["007", "007", "7"]
    assert imported.interactions["item_id"].tolist() == ["0042", "43", "43"]
    assert imported.titles == {"0042": "Heat (1995)", "43": "1984"}


@pytest.mark.parametrize("case", ["missing column", "not numeric", "no items file", "not a folder", "bad name"])
def test_cli_import_malformed_gives_one_line_error(apa_home: Path, tmp_path: Path, case: str) -> None:
    source = tmp_path / "broken"
    source.mkdir()
    interactions, items = raw_frames()
    name = "ok"
    if case == "missing column":
        interactions.drop(columns=["timestamp"]).to_csv(source / "interactions.csv", index=False)
    elif case == "not numeric":
        interactions.assign(rating="five").to_csv(source / "interactions.csv", index=False)
    else:
        interactions.to_csv(source / "interactions.csv", index=False)
    if case != "no items file":
        items.to_csv(source / "items.csv", index=False)
    if case == "bad name":
        name = "../escape"
    target = source / "interactions.csv" if case == "not a folder" else source
    result = _invoke("data", "import", str(target), "--name", name)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert not (apa_home / "datasets" / name).exists()


def test_check_run_passes_then_catches_tampering(trained: TrainedRun, tmp_path: Path) -> None:
    report = check_run(trained.run_dir, trained.base)
    assert report.ok, report.problems
    assert sum("loads with peft.PeftModel.from_pretrained" in line for line in report.checked) == len(ADAPTERS)

    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    path = artifacts.version_dir(copy, 1, 1) / "manifest.json"
    doc = artifacts.read_json(path)
    doc["samples"].append(_manifest(copy, 0)["samples"][0])  # shard 1 now claims a sample of shard 0
    path.write_text(json.dumps(doc))
    problems = check_run(copy).problems
    assert any("manifest_sha256 does not recompute" in p for p in problems)
    assert any("is in shards 0 and 1" in p for p in problems)
