"""The processes: ``apa serve`` (the gateway) and ``apa worker`` (the retraining worker)."""

from typing import Annotated

import typer

from apa.errors import APAError
from cli.common import fail


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
        fail(exc)
    uvicorn.run(application, host=host, port=port, log_config=None)  # logs through apa.logs' configuration


def run_worker(
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty")] = False,
) -> None:
    """Run the retraining worker (RQ SimpleWorker; loads the base model once)."""
    from worker.main import run
    from worker.settings import get_worker_settings

    try:
        run(get_worker_settings(), burst=burst)
    except APAError as exc:
        fail(exc)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command("worker")(run_worker)
