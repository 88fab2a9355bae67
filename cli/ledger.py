"""The ledger: ``apa ledger upgrade|downgrade|import``, ``apa audit``; ``record`` is how ``apa train``
records its run."""

import json
from pathlib import Path
from typing import Annotated

import typer

from apa.errors import APAError
from apa.settings import get_settings
from cli.common import fail, resolve_run
from ledger.errors import LedgerError

ledger = typer.Typer(help="The SQL ledger (APA_DATABASE_URL; default sqlite:///<APA_HOME>/apa.db).",
                     no_args_is_help=True)


def record(folder: Path) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db
    from worker.record import import_run

    settings = get_settings()
    try:
        db.upgrade(settings.ledger_url)
        with db.session_scope(settings.ledger_url) as session:
            summary = import_run(session, folder, settings)
    except SQLAlchemyError as exc:
        raise LedgerError(f"ledger {db.redact(settings.ledger_url)}: {exc}") from exc
    what = "recorded" if summary.created else "already recorded; updated"
    typer.echo(f"ledger ({db.redact(settings.ledger_url)}): {what} run {folder.name}: "
               f"{summary.interactions} interactions, {summary.samples} samples, "
               f"{summary.versions_added} adapter version(s) added, "
               f"{summary.skipped_forgotten} forgotten interaction(s) and sample(s) skipped")


def _migrate(direction: str, revision: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db

    url = get_settings().ledger_url
    try:
        (db.upgrade if direction == "up" else db.downgrade)(url, revision)
        typer.echo(f"ledger {db.redact(url)} at migration {db.current_revision(url)}")
    except (APAError, SQLAlchemyError) as exc:
        fail(exc)


@ledger.command("upgrade")
def ledger_upgrade(revision: Annotated[str, typer.Argument(help="Target migration")] = "head") -> None:
    """Create or migrate the ledger's tables (Alembic)."""
    _migrate("up", revision)


@ledger.command("downgrade")
def ledger_downgrade(revision: Annotated[str, typer.Argument(help="Target migration")] = "base") -> None:
    """Undo migrations (``base`` drops every ledger table)."""
    _migrate("down", revision)


@ledger.command("import")
def ledger_import(
    run: Annotated[Path, typer.Argument(help="Run folder written by `apa train`")],
) -> None:
    """Record a run in the ledger (migrates it first). Safe to run again; forgotten data stays out."""
    try:
        record(resolve_run(run))
    except APAError as exc:
        fail(exc)


def audit(request_id: Annotated[str, typer.Argument(help="A deletion request id")]) -> None:
    """Print a deletion request: status history, certificate and its audit-log entries (JSON)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ledger import db
    from ledger.audit import deletion_report

    try:
        with db.session_scope(get_settings().ledger_url) as session:
            report = deletion_report(session=session, request_id=request_id)
    except (APAError, SQLAlchemyError) as exc:
        fail(exc)
    typer.echo(json.dumps(report, indent=2, default=str))


def register(app: typer.Typer) -> None:
    app.add_typer(ledger, name="ledger")
    app.command()(audit)
