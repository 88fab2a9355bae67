"""``/admin/*``: the shards, the queue, the deletions, the model and the attention; a retrain accepted."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ShardState = Literal["serving", "quarantined", "retraining", "failed"]


class ShardStatus(BaseModel):
    shard: int
    state: ShardState
    version: int | None
    n_samples: int | None
    trained_at: datetime | None
    manifest_sha256: str | None
    pending_samples: int = Field(0, description="Ingested training samples no version of this shard has trained on")
    next_retrain_due: datetime | None = Field(None, description="When those samples' retrain is due "
                                                                "(APA_INGEST_MIN_SAMPLES or APA_INGEST_MAX_DELAY_S)")
    ingest_error: str | None = Field(None, description="The last retrain for ingested data failed (the old version "
                                                       "serves on); its triggers wait for POST "
                                                       "/admin/shards/{k}/retrain")


class QueueStatus(BaseModel):
    depth: int | None = Field(description="Jobs waiting; null when Redis cannot be reached")
    workers: int | None


class ModelInfo(BaseModel):
    name: str
    sha256: str


class AttentionSetting(BaseModel):
    error: str = Field(description="mae | brier | logloss (or auto, as configured)")
    knn: int | Literal["all", "auto"]
    tau: float | Literal["auto"]


class AttentionStatus(BaseModel):
    mode: Literal["nd", "d"]
    configured: AttentionSetting = Field(description="APA_ATTENTION_ERROR, APA_KNN and APA_TAU")
    in_use: AttentionSetting | None = Field(description="The attention in use, chosen on the validation memory "
                                                        "(leave one out) where configured auto; null before the "
                                                        "first sync")
    loo_valid_auc: float | None = Field(description="Leave-one-out validation AUC of the attention in use; null "
                                                    "when too few samples were left to choose with")
    validation_samples: int = Field(description="Live validation samples the per-user weights attend over")


class ForgetStatus(BaseModel):
    deadline_s: float = Field(description="APA_FORGET_DEADLINE_S: a deletion completes within it")
    oldest_open_s: float | None = Field(description="How long the oldest open deletion has waited (this replica's "
                                                    "last ledger sync); null when none is open")
    overdue: int = Field(description="Open deletions past the deadline (alert on > 0)")
    stance: Literal["normal", "yield", "shed"] = Field(
        description="normal; yield: the model thread sleeps between batches; shed: /recommend answers 503")


class IngestStatus(BaseModel):
    min_samples: int = Field(description="APA_INGEST_MIN_SAMPLES: a shard retrains once this many wait")
    max_delay_s: float = Field(description="APA_INGEST_MAX_DELAY_S: ... or once the oldest waited this long")
    unplaced_samples: int = Field(description="New training samples a semantic run's worker has still to embed "
                                              "and place")


class AdminStatus(BaseModel):
    shards: list[ShardStatus]
    queue: QueueStatus
    deletions: dict[str, int]
    model: ModelInfo
    attention: AttentionStatus
    forget: ForgetStatus | None = None
    ingest: IngestStatus | None = None


class RetrainAccepted(BaseModel):
    shard: int
    enqueued: bool = Field(description="False when a retrain of this shard is already waiting")
