"""What every command group shares: the error exit, the base model, the run folder."""

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from apa.settings import get_settings

if TYPE_CHECKING:
    from apa.model import BaseModel


def fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def load_base(device: str) -> "BaseModel":
    from apa.model import load_base_model

    return load_base_model(get_settings().base_model_dir, device=device)


def resolve_run(run: Path | None) -> Path:
    """The given run folder, or the newest under ``<APA_HOME>/runs``."""
    from apa import artifacts

    return artifacts.require_run(run) if run else artifacts.newest_run(get_settings().runs_dir)
