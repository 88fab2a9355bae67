"""Core settings, built on demand (never at import time).

The service and the worker extend :class:`CoreSettings` with their own process settings
(``service.settings``, ``worker.settings``); everything here is shared by every process.
"""

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """Where assets, datasets, runs and the ledger live. Environment variables are prefixed ``APA_``."""

    model_config = SettingsConfigDict(env_prefix="APA_")

    home: Path = Path("var")
    database_url: str | None = None  # unset: sqlite:///<home>/apa.db
    hmac_key: SecretStr | None = None  # unset: a random key kept in <home>/hmac.key (mode 0600)
    base_model_path: Path | None = None  # unset: <home>/assets/smollm2-135m-instruct
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "apa:"  # every queue name, lock and channel starts with it
    retrain_timeout_s: int = 6 * 3600  # RQ job timeout: above the longest retrain
    # A retrain that raises is run again by RQ (rq.Retry) up to this many attempts in all, after
    # backoff_s, 2 x backoff_s, ... seconds, with its shard lock released in between; a validation
    # gate's refusal is final (training is deterministic). Whoever enqueues (gateway, worker) uses it.
    max_attempts: int = 3
    backoff_s: float = 5.0
    # A deletion must complete (its retrained shards serving) within this many seconds of its request;
    # the gateway yields and then sheds /recommend to keep it so (service/deadline.py).
    forget_deadline_s: float = 3600.0
    # Online learning (POST /users/{id}/interactions): a seeded fraction of the new samples joins the
    # validation memory; a shard retrains once ingest_min_samples of its samples are pending or the
    # oldest is ingest_max_delay_s old. Semantic runs: no shard grows past ceil((N + n) / K * ingest_balance).
    ingest_valid_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    ingest_min_samples: Annotated[int, Field(ge=1)] = 32
    ingest_max_delay_s: Annotated[float, Field(ge=0)] = 3600.0
    ingest_balance: Annotated[float, Field(ge=1)] = 1.25
    # Logging (apa.logs): text or json lines, at this level; checked when a process configures its logs.
    log_format: str = "text"
    log_level: str = "INFO"
    # The ledger's Alembic migrations; unset: the source tree's. An installed (non-editable) package, as
    # in the Docker image, names them.
    migrations_dir: Path | None = None

    @property
    def assets_dir(self) -> Path:
        return self.home / "assets"

    @property
    def base_model_dir(self) -> Path:
        return self.base_model_path or self.assets_dir / "smollm2-135m-instruct"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'apa.db').resolve()}"

    def hmac_secret(self) -> bytes:
        """The key that identifies deleted data afterwards (DESIGN.md: HMAC-SHA256, never plain hashes)."""
        if self.hmac_key is not None:
            return self.hmac_key.get_secret_value().encode()
        path = self.home / "hmac.key"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "x", opener=lambda p, flags: os.open(p, flags, 0o600)) as handle:
                    handle.write(secrets.token_hex(32))
            except FileExistsError:  # another process made it first
                pass
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> CoreSettings:
    return CoreSettings()
