"""A deletion request as accepted, and as followed until its certificate."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeletionStatus = Literal["quarantined", "retraining", "completed", "failed"]


class DeletionAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "5f0c6e0f2b7d4f0e9d7b0b0f6a1c2d3e", "status": "quarantined", "affected_shards": [1, 3]}]})

    request_id: str
    status: DeletionStatus
    affected_shards: list[int]


class ShardCertificate(BaseModel):
    shard: int
    old_version: int | None
    new_version: int | None
    old_manifest_sha256: str | None = Field(None, description="Always null: the old version held the deleted "
                                                              "data, and a plain hash of its manifest would let "
                                                              "anyone confirm a guess of it (old_manifest_hmac)")
    old_manifest_hmac: str | None = Field(None, description="HMAC-SHA256 (APA_HMAC_KEY) of the old version's "
                                                            "manifest_sha256")
    new_manifest_sha256: str | None = Field(None, description="null once a later deletion purged the new version")
    new_adapter_sha256: str | None = Field(None, description="sha256 of the new version's adapter_model.safetensors "
                                                             "(null once a later deletion purged it)")
    verify: str | None = Field(None, description="The command that retrains the new version from its manifest "
                                                 "alone and compares those bytes (exit 0: the same)")


class Certificate(BaseModel):
    request_id: str
    interactions_removed: int
    samples_removed: int
    untrained_samples_removed: int = Field(0, description="Ingested samples removed before any version trained on "
                                                          "them: they cost no retrain")
    shards: list[ShardCertificate]
    deleted_hmacs: list[str] = Field(description="HMAC-SHA256 of each deleted interaction key (APA_HMAC_KEY)")
    serving_manifests_checked: int
    violations: int
    centres_recomputed: bool = Field(False, description="True once the purge that follows completion (the same "
                                                        "worker job) recomputed the run's semantic centres from "
                                                        "the live training samples: the K-means fit saw the "
                                                        "deleted ones. False before, and for runs without "
                                                        "centres (random or user partition)")
    centre_members: int | None = Field(None, description="How many live training samples those centres are the "
                                                         "mean of")
    issued_at: datetime


class DeletionRequestPublic(BaseModel):
    request_id: str
    status: DeletionStatus
    affected_shards: list[int]
    created_at: datetime
    completed_at: datetime | None
    certificate: Certificate | None
    error: str | None = None
    overdue: bool = Field(False, description="It took (or has taken so far) longer than APA_FORGET_DEADLINE_S")
