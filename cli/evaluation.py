"""Evaluation and checks: ``apa eval``, ``apa check``, ``apa verify``."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from apa.errors import APAError, RunNotFound
from cli.common import fail, load_base, resolve_run


def _grid_values(option: str, value: str, parse: Callable[[str], object], full: tuple[Any, ...]) -> tuple[Any, ...]:
    if value == "auto":
        return full
    try:
        return (parse(value),)
    except ValueError:
        fail(ValueError(f"{option} must be 'auto' or a value, not {value!r}"))
        raise AssertionError("unreachable") from None


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
    from apa.evaluation import markdown, predictions_path

    if weights not in aggregation.WEIGHT_MODES:
        fail(ValueError(f"--weights must be one of {list(aggregation.WEIGHT_MODES)}"))
    try:
        grid = aggregation.AttentionGrid(
            errors=_grid_values("--error", error, str, aggregation.ERROR_GRID),
            knns=_grid_values("--knn", knn, lambda v: None if v == "all" else int(v), aggregation.KNN_GRID),
            taus=_grid_values("--tau", tau, float, aggregation.TAU_GRID))
        run_dir = resolve_run(run)
        report, table = run_eval(run_dir, load_base(device), weights_mode=weights,
                                 grid=grid, batch_size=batch_size, resamples=resamples)
    except APAError as exc:
        fail(exc)
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


def check(
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the newest under <APA_HOME>/runs)")] = None,
    peft_load: Annotated[bool, typer.Option(help="Also load every adapter with PEFT on the base model")] = True,
) -> None:
    """Verify a run: manifest hashes, shards disjoint and covering the training split, PEFT loads."""
    from apa.integrity import check_run

    try:
        run_dir = resolve_run(run)
        report = check_run(run_dir, load_base("cpu") if peft_load else None)
    except APAError as exc:
        fail(exc)
    for line in report.checked:
        typer.echo(f"ok   {line}")
    for line in report.problems:
        typer.secho(f"FAIL {line}", fg=typer.colors.RED)
    if not report.ok:
        raise typer.Exit(code=1)


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
        base = load_base(device)
        failed = 0
        for which, number in targets:
            result = verify_version(run_dir, base, which, number)
            typer.echo(f"{which} v{number}: published {result.published_sha256[:16]}, on disk "
                       f"{result.file_sha256[:16]}, replayed {result.replayed_sha256[:16]} ({result.seconds} s): "
                       f"{result.verdict()}")
            failed += not result.equal
    except APAError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None  # 1 is kept for "replayed to other bytes"
    typer.echo(f"verified {len(targets) - failed} of {len(targets)} version(s)")
    raise typer.Exit(1 if failed else 0)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
    app.command()(check)
    app.command()(verify)
