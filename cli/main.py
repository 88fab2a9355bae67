"""The ``apa`` entry point: every command group on one Typer app, the logs configured first."""

import typer

from apa import logs
from cli import data, evaluation, ledger, processes

app = typer.Typer(help="APA-Rec: LLM recommendation with exact unlearning (Adapter Partition and Aggregation).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
for group in (data, evaluation, processes, ledger):
    group.register(app)


def main() -> None:
    try:
        logs.configure()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    main()
