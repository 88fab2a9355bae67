"""Test AUC of APA and its baselines on MovieLens-100K with SmolLM2, driving `apa train` / `apa eval`.

Each configuration trains into ``<APA_HOME>/bench/quality/<name>`` and is evaluated with per-sample
(the paper's) and per-user (the service's) weights. Everything resumes: a finished adapter is kept,
an unfinished one continues from its last finished epoch, a finished evaluation pass is read back.
So a long preset can run in the background and be started again after an interruption::

    nohup python bench/quality.py --preset paper --out docs/results/quality-paper.json > paper.log 2>&1 &

Presets (all: lr 3e-4, batch 8, at most 6 epochs with patience 2 on validation, seed 0, fp32):

* ``paper``     K=4, 1024/500/1000 samples (the paper's scale; several hours on 2 CPU cores)
* ``paper-k8``  K=8 on the same samples (reuses the paper preset's single baseline)
* ``paper-s1``, ``paper-s2``  the paper preset with seeds 1 and 2 (another split, partition and init)
* ``cpu``       K=4, 512/250/250
* ``cpu-k2``    K=2, 256/128/256, at most 4 epochs
* ``ablation``  partition semantic / random / user at K=2, 256/128/256
* ``--quick``   K=2, 64/32/64, one epoch: the same tables and JSON keys in minutes

The paper presets keep their state in a committed folder, ``docs/results/runs/<config>/``
(``bench.state``; ``--state DIR`` elsewhere, ``--no-state`` to skip): every finished unit is copied there as
soon as it is finished, and a run whose work folder is gone (a new machine) restores from it, checked
against the recorded sha256, and goes on where it stood. Commit that folder before the machine goes.
``--re-evaluate`` evaluates a finished run again after a change to the evaluation code: the reports are
rewritten, and only the forward passes whose adapters, weights or prompts changed run again (the others
come from the pass cache, which keeps the superseded passes too).

The report's top-level ``auc``, ``ci95`` and ``paired`` are the first configuration's, per-sample
weights; ``<out>-predictions.csv.gz`` holds its per-sample predictions and weights, from which the
AUCs recompute (``python bench/quality.py --check-predictions REPORT``).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from apa import artifacts, sisa
from apa.evaluation import METHODS, predictions_path, recompute_auc
from apa.runs import RunData, adapter_seed, read_run
from apa.settings import get_settings
from bench import quick
from bench.machine import command_line, describe, write_report
from bench.state import RunState
from bench.state import describe as describe_state

WEIGHTS = ("per-sample", "per-user")


@dataclass(frozen=True)
class Config:
    name: str
    shards: int
    n_train: int
    n_valid: int
    n_test: int
    max_epochs: int = 6
    patience: int = 2
    seed: int = 0
    partition: str = "semantic"
    dataset: str = "movielens-100k"
    min_history: int = 10
    batch_size: int = 8

    def train_args(self) -> list[str]:
        return ["--shards", str(self.shards), "--train-samples", str(self.n_train), "--valid-samples",
                str(self.n_valid), "--test-samples", str(self.n_test), "--max-epochs", str(self.max_epochs),
                "--patience", str(self.patience), "--seed", str(self.seed), "--partition", self.partition,
                "--lr", "3e-4", "--dataset", self.dataset, "--min-history", str(self.min_history),
                "--batch-size", str(self.batch_size)]


def ablation(k: int, n: tuple[int, int, int]) -> list[Config]:
    return [Config(f"ablation-k{k}-{p}", k, *n, partition=p) for p in ("semantic", "random", "user")]


PRESETS: dict[str, list[Config]] = {
    "quick": [Config("quick-k2", quick.SHARDS, quick.N_TRAIN, quick.N_VALID, quick.N_TEST, max_epochs=quick.EPOCHS)],
    "paper": [Config("paper-k4-s0", 4, 1024, 500, 1000)],
    "paper-k8": [Config("paper-k8-s0", 8, 1024, 500, 1000)],
    "paper-s1": [Config("paper-k4-s1", 4, 1024, 500, 1000, seed=1)],
    "paper-s2": [Config("paper-k4-s2", 4, 1024, 500, 1000, seed=2)],
    "cpu": [Config("cpu-k4-512", 4, 512, 250, 250)],
    "cpu-k2": [Config("cpu-k2-256", 2, 256, 128, 256, max_epochs=4)],
    "ablation": ablation(2, (256, 128, 256)),
}
DONORS: dict[str, list[str]] = {"paper-k8": ["paper-k4-s0"]}  # other presets' runs whose baselines may fit
STATEFUL = {"paper", "paper-k8", "paper-s1", "paper-s2"}  # presets whose state is committed by default
STATE_ROOT = Path("docs/results/runs")


def apa(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli", *args], check=True)


def _same_validation(mine: RunData, theirs: RunData) -> bool:
    def split(data: RunData) -> list[tuple[str, str, int]]:
        return [(s.sample_id, data.prompts[s.sample_id], s.label) for s in data.splits["valid"]]

    return mine.base_model_sha256 == theirs.base_model_sha256 and split(mine) == split(theirs)


def _aliases(adapter: int | str, donor: RunData) -> list[int | str]:
    """The donor's adapter ids that could be the baseline ``adapter``: the same id, and for SISA's
    shard k also a random run's own shard k."""
    k = sisa.shard_of(adapter)
    return [adapter, k] if k is not None and donor.own_sisa() else [adapter]


def donor_version(run: Path, adapter: int | str, donors: list[Path]) -> Path | None:
    """A donor's first version of the adapter ``run`` would train as ``adapter``: the same manifest
    hash (samples, training config, seed, base model) and the same validation split (which picks the
    epoch kept), so training it again would give the same adapter. None if no donor has one."""
    mine = read_run(run)
    expected = artifacts.manifest(shard=adapter, samples=mine.adapter_samples(adapter),
                                  config=mine.config.train.as_dict(), seed=adapter_seed(mine, adapter),
                                  base_model_sha256=mine.base_model_sha256)["manifest_sha256"]
    for donor in donors:
        if not (donor / "run.json").is_file():
            continue
        theirs = read_run(donor)
        if not _same_validation(mine, theirs):
            continue
        for alias in _aliases(adapter, theirs):
            folder = artifacts.version_dir(donor, alias, 1)
            if (folder / "manifest.json").is_file() and \
                    artifacts.read_json(folder / "manifest.json")["manifest_sha256"] == expected:
                return folder
    return None


def baseline_ids(run: RunData) -> list[int | str]:
    ids: list[int | str] = [artifacts.SINGLE]
    return ids + ([] if run.own_sisa() else [sisa.adapter_id(k) for k in range(run.config.shards)])


def adapter_seconds(run: Path, data: RunData) -> dict[str, dict[str, Any]]:
    """Each adapter's training and per-epoch validation time and epochs, from its first version's
    manifest (unlike this invocation's wall time, it survives a resume; a copied adapter reports
    its donor's)."""
    out = {}
    for adapter in [*range(data.config.shards), *baseline_ids(data)]:
        doc = artifacts.read_json(artifacts.version_dir(run, adapter, 1) / "manifest.json")["training"]
        out[str(adapter)] = {"train_s": doc["seconds"], "validation_s": doc.get("validation_seconds", 0.0),
                             "epochs_run": doc.get("epochs_run"), "epoch_kept": doc.get("epoch_kept"),
                             "n_samples": len(data.adapter_samples(adapter))}
    return out


def run_config(cfg: Config, root: Path, device: str, donors: list[Path], state: Path | None = None,
               re_evaluate: bool = False) -> dict[str, Any]:
    """Train (resuming) and evaluate one configuration, copying a donor's baseline where it is the
    same adapter (``donor_version``). With a ``state`` folder, first restore what it holds that the work
    folder lacks, and copy every unit into it as soon as it is finished. ``re_evaluate``: run ``apa eval``
    even where its report exists."""
    if state is None:
        return _run_config(cfg, root, device, donors, re_evaluate)
    saved = RunState(state, root / cfg.name)
    restored = saved.restore()
    print(f"{cfg.name}: state {state}: {len(saved.units)} units, {len(restored)} restored into the work folder",
          flush=True)
    with saved.syncing():
        result = _run_config(cfg, root, device, donors, re_evaluate)
    result["state"] = {"folder": str(state), **json.loads(describe_state(saved))}
    return result


def _run_config(cfg: Config, root: Path, device: str, donors: list[Path], re_evaluate: bool) -> dict[str, Any]:
    run = root / cfg.name
    started = time.perf_counter()
    apa("train", *cfg.train_args(), "--no-single", "--no-sisa", "--no-ledger", "--device", device, "--out", str(run))
    data = read_run(run)
    copied: dict[str, str] = {}
    for adapter in baseline_ids(data):
        if artifacts.latest_version(run, adapter) is not None:
            continue
        source = donor_version(run, adapter, donors)
        if source is not None:
            target = artifacts.version_dir(run, adapter, 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target)
            copied[str(adapter)] = str(source.relative_to(root))
            print(f"{cfg.name}: {adapter} is {source.relative_to(root)} (same samples, config, seed, validation)",
                  flush=True)
    apa("train", *cfg.train_args(), "--no-ledger", "--device", device, "--out", str(run))
    train_s = time.perf_counter() - started
    result: dict[str, Any] = {"config": asdict(cfg), "train_wall_s": round(train_s, 1),
                              "adapters": adapter_seconds(run, data), "copied_from": copied, "eval": {}}
    for weights in WEIGHTS:
        out = run / f"eval-{weights}.json"
        if re_evaluate or not out.is_file():
            apa("eval", "--run", str(run), "--weights", weights, "--device", device, "--out", str(out))
        result["eval"][weights] = json.loads(out.read_text())
    result["checks"] = checks(result["eval"]["per-sample"])
    return result


def checks(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read off one report (None where a baseline is missing)."""
    auc, paired = report["auc"], report["paired"]

    def ratio(a: str, b: str) -> float | None:
        return round(auc[a] / auc[b], 4) if a in auc and b in auc else None

    def above(pair: str) -> bool | None:
        return paired[pair][1] > 0 if pair in paired else None

    return {"apa_nd_over_single": ratio("apa_nd", "single"),
            "apa_nd_paper_over_single": ratio("apa_nd_paper", "single"),
            "apa_nd_ge_0.97_single": auc["apa_nd"] >= 0.97 * auc["single"] if "single" in auc else None,
            "apa_nd_gt_sisa_paired_ci_above_0": above("apa_nd-sisa"),
            "apa_nd_ge_best_shard": auc["apa_nd"] >= auc["best_shard"],
            "apa_nd_ge_avg_semantic": auc["apa_nd"] >= auc["avg_semantic"],
            "apa_nd_ge_single": auc["apa_nd"] >= auc["single"] if "single" in auc else None,
            "trained_gt_base": all(auc[m] > auc["base"] for m in METHODS if m in auc and m not in
                                   ("base", "item_mean"))}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | weights | method | test AUC | 95% CI |", "|---|---|---|---:|---|"]
    for r in results:
        for weights, report in r["eval"].items():
            for method, value in sorted(report["auc"].items(), key=lambda kv: -kv[1]):
                low, high = report["ci95"][method]
                lines.append(f"| {r['config']['name']} | {weights} | {method} | {value:.4f} | "
                             f"[{low:.4f}, {high:.4f}] |")
    lines.append("")
    for r in results:
        for weights, report in r["eval"].items():
            for pair, (diff, low, high) in report["paired"].items():
                lines.append(f"* {r['config']['name']} {weights}: {pair} {diff:+.4f} [{low:+.4f}, {high:+.4f}]")
            chosen = report["attention"]["chosen"]
            lines.append(f"* {r['config']['name']} {weights}: attention {chosen['error']}/{chosen['knn']}/"
                         f"{chosen['tau']:g} (LOO valid AUC {chosen['loo_valid_auc']:.4f})")
    return "\n".join(lines)


def check_predictions(report_path: Path) -> bool:
    """Whether the per-sample file recomputes the report's top-level AUCs."""
    report = json.loads(report_path.read_text())
    frame = pd.read_csv(predictions_path(report_path))
    again = recompute_auc(frame, list(report["auc"]))
    for method, value in report["auc"].items():
        print(f"{method}: report {value:.4f}, recomputed {again[method]:.4f}")
    return again == report["auc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="report JSON; its per-sample predictions go beside it")
    parser.add_argument("--state", type=Path, metavar="DIR",
                        help=f"keep each configuration's state under DIR/<config> (default {STATE_ROOT} for "
                             f"{', '.join(sorted(STATEFUL))})")
    parser.add_argument("--no-state", action="store_true", help="keep no state folder")
    parser.add_argument("--re-evaluate", action="store_true",
                        help="evaluate again where a report exists (after a change to the evaluation code)")
    parser.add_argument("--check-predictions", type=Path, metavar="REPORT",
                        help="only recompute REPORT's AUCs from its predictions file")
    args = parser.parse_args()
    if args.check_predictions:
        return 0 if check_predictions(args.check_predictions) else 1
    preset = "quick" if args.quick else args.preset
    root = get_settings().home / "bench" / "quality"
    results: list[dict[str, Any]] = []
    donors = [root / name for name in DONORS.get(preset, [])]
    state_root = None if args.no_state else args.state or (STATE_ROOT if preset in STATEFUL else None)
    for donor in donors:  # another preset's run, maybe only in its state folder (a new machine)
        if state_root is not None and (state_root / donor.name / "state.json").is_file():
            RunState(state_root / donor.name, donor).restore()
    for cfg in PRESETS[preset]:
        results.append(run_config(cfg, root, args.device, donors=donors + [root / r["config"]["name"]
                                                                          for r in results],
                                  state=None if state_root is None else state_root / cfg.name,
                                  re_evaluate=args.re_evaluate))
    first = results[0]["eval"]["per-sample"]
    report = {"benchmark": "quality", "preset": preset, "machine": describe(args.device),
              "command": command_line("bench/quality.py"),
              "auc": first["auc"], "ci95": first["ci95"], "paired": first["paired"], "results": results}
    print(table(results))
    write_report(report, args.out)
    if args.out:
        shutil.copyfile(predictions_path(root / results[0]["config"]["name"] / "eval-per-sample.json"),
                        predictions_path(args.out))
        print(f"wrote {args.out} and {predictions_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
