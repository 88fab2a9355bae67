"""The gateway process's settings (environment ``APA_*``), built on demand."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr

from apa import aggregation
from apa.settings import CoreSettings
from service.deadline import Policy

Auto = Literal["auto"]


class ServiceSettings(CoreSettings):
    admin_token: SecretStr | None = None  # required: DELETE and /admin/* need it
    # Optional: when set, /recommend needs it (or the admin token) as a bearer token; unset, /recommend
    # is open and bounded only by the body limit and the model queue's admission (APA_MAX_MODEL_WAITING).
    recommend_token: SecretStr | None = None
    device: str = "cpu"
    mode: Literal["nd", "d"] = "nd"  # APA(ND) exact mixture, or APA(D)
    # The attention: each part a value, or auto (chosen on the validation memory, leave one out, each
    # time the memory changes). The paper's is mae / 20 / 1000.
    attention_error: Literal["mae", "brier", "logloss"] | Auto = "auto"
    knn: Annotated[int, Field(ge=1)] | Literal["all"] | Auto = "auto"
    tau: Annotated[float, Field(ge=0)] | Auto = "auto"
    popular_candidates: int = 20  # candidates when a request names none
    score_batch_size: Annotated[int, Field(ge=1)] = 8  # prompts per forward
    # With prefix sharing: a user's candidates packed into one forward after their prefix (one row, a
    # block mask); 20 candidates of ~14 tokens each make a ~280-token row.
    packed_prompts: Annotated[int, Field(ge=1)] = 32
    batch_window_ms: float = 5.0  # how long the micro-batcher waits for concurrent requests
    max_batch_prompts: int = 128
    poll_interval_s: float = 2.0  # ledger poll, the fallback to pub/sub
    history_cache_size: int = 4096  # users whose history embedding is kept (0: recompute every request)
    # A user's candidates share their prompt up to the target title: run that prefix once, then only the
    # suffixes (exact). false: a full forward per candidate, as before.
    prefix_sharing: bool = True
    # Recent users' prefixes (keys and values) kept across requests, least recently used dropped first;
    # about 46 KiB per prefix token with SmolLM2-135M in fp32 (~9 MiB per user). 0: off.
    prefix_cache_mb: Annotated[float, Field(ge=0)] = 256.0
    # The time-to-forget policy (service/deadline.py), as fractions of APA_FORGET_DEADLINE_S that the
    # oldest open deletion has waited: from yield_at the model thread sleeps yield_ratio x each batch's
    # time after it; from shed_at /recommend answers 503 + Retry-After until the retrain is live.
    forget_yield_at: Annotated[float, Field(ge=0)] = 0.25
    forget_shed_at: Annotated[float, Field(ge=0)] = 0.75
    forget_yield_ratio: Annotated[float, Field(ge=0)] = 1.0
    shed_retry_after_s: Annotated[int, Field(ge=1)] = 5
    # Every request answers within this (503 + Retry-After past it: service/timeout.py); 0 turns it off.
    # Above the slowest /recommend the model should serve (a 20-candidate request on 2 CPU cores: ~12 s).
    request_timeout_s: Annotated[float, Field(ge=0)] = 120.0
    # The ledger: a refused or silent database answers 503 in bounded time instead of holding threads.
    ledger_connect_timeout_s: Annotated[int, Field(ge=1)] = 5
    ledger_statement_timeout_s: Annotated[float, Field(gt=0)] = 15.0  # PostgreSQL statements; SQLite's lock wait
    # Bounded work: each limit answers at once (413, 429, 503 + Retry-After) instead of queueing.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    admin_rate_per_s: Annotated[float, Field(gt=0)] = 5.0  # DELETE, PUT /items and /admin/* per bearer token
    admin_burst: Annotated[int, Field(ge=1)] = 30
    # POST /users/{id}/interactions: APA_INGEST_TOKEN (or the admin token), each token at its own rate,
    # shared by every replica (service/limits.py). Unset: only the admin token may ingest.
    ingest_token: SecretStr | None = None
    ingest_rate_per_s: Annotated[float, Field(gt=0)] = 50.0
    ingest_burst: Annotated[int, Field(ge=1)] = 100
    max_model_waiting: Annotated[int, Field(ge=1)] = 16  # /recommend requests waiting for the model thread
    probe_timeout_s: Annotated[float, Field(gt=0)] = 2.0  # /readyz's ledger and Redis checks
    # The scoring engine (apa.engines.ENGINES): torch, in this process; or vllm, a client of a vLLM server
    # (scripts/vllm-serve.sh) that loads each weight vector's merged adapter from vllm_adapter_dir, a
    # folder both processes see at the same path. The history embedding always uses the local base model.
    engine: Literal["torch", "vllm"] = "torch"
    vllm_url: str = "http://127.0.0.1:8000"
    vllm_adapter_dir: Path | None = None  # unset: <home>/vllm-adapters
    vllm_max_adapters: Annotated[int, Field(ge=1)] = 8  # merged adapters kept loaded (least recently used go)
    # > 0: weight vectors snapped to this grid before merging (fewer distinct adapters; each weight moves
    # by less than the step). 0: exact weights, one adapter per distinct weight vector.
    vllm_weight_step: Annotated[float, Field(ge=0, lt=1)] = 0.0
    vllm_timeout_s: Annotated[float, Field(gt=0)] = 600.0

    def forget_policy(self) -> Policy:
        """The time-to-forget policy (service/deadline.py) these settings describe."""
        return Policy(deadline_s=self.forget_deadline_s, yield_at=self.forget_yield_at, shed_at=self.forget_shed_at,
                      yield_ratio=self.forget_yield_ratio)

    def engine_options(self) -> dict[str, Any]:
        """Keyword options of ``apa.engines.ENGINES[self.engine]``."""
        if self.engine == "vllm":
            return {"url": self.vllm_url, "adapter_dir": self.vllm_adapter_dir or self.home / "vllm-adapters",
                    "max_adapters": self.vllm_max_adapters, "weight_step": self.vllm_weight_step,
                    "timeout_s": self.vllm_timeout_s}
        return {"prefix_cache_bytes": int(self.prefix_cache_mb * 2**20) if self.prefix_sharing else 0}

    def ledger_timeouts(self) -> dict[str, Any]:
        return {"connect_timeout_s": self.ledger_connect_timeout_s,
                "statement_timeout_s": self.ledger_statement_timeout_s}

    def attention_grid(self) -> aggregation.AttentionGrid:
        """The settings the gateway chooses its attention from (a fixed part is a grid of one)."""
        return aggregation.AttentionGrid(
            errors=aggregation.ERROR_GRID if self.attention_error == "auto" else (self.attention_error,),
            knns=aggregation.KNN_GRID if self.knn == "auto" else (None if self.knn == "all" else self.knn,),
            taus=aggregation.TAU_GRID if self.tau == "auto" else (self.tau,))


@lru_cache
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
