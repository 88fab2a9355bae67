"""The gateway process's settings (environment ``APA_*``), built on demand."""

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr

from apa.aggregation import PAPER_TAU
from apa.settings import CoreSettings


class ServiceSettings(CoreSettings):
    admin_token: SecretStr | None = None  # required: DELETE and /admin/* need it
    device: str = "cpu"
    mode: Literal["nd", "d"] = "nd"  # APA(ND) exact mixture, or APA(D)
    knn: int = 20
    tau: Annotated[float, Field(ge=0)] | Literal["auto"] = PAPER_TAU  # auto: chosen on the validation memory
    popular_candidates: int = 20  # candidates when a request names none
    score_batch_size: int = 8  # prompts per forward
    batch_window_ms: float = 5.0  # how long the micro-batcher waits for concurrent requests
    max_batch_prompts: int = 128
    poll_interval_s: float = 2.0  # ledger poll, the fallback to pub/sub
    history_cache_size: int = 4096  # users whose history embedding is kept (0: recompute every request)


@lru_cache
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
