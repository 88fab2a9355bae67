"""Core settings, built on demand (never at import time)."""

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """Where assets, datasets and runs live. Environment: ``APA_HOME`` (default ``./var``)."""

    model_config = SettingsConfigDict(env_prefix="APA_")

    home: Path = Path("var")

    @property
    def assets_dir(self) -> Path:
        return self.home / "assets"

    @property
    def base_model_dir(self) -> Path:
        return self.assets_dir / "smollm2-135m-instruct"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


@lru_cache
def get_settings() -> CoreSettings:
    return CoreSettings()
