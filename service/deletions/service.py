"""The deletion use case: record the request, take the shards out of serving before the commit, forget
the user here, and wake the worker.

Order matters. The ledger's ``request_deletion`` tombstones and quarantines in one transaction; this
replica drops the deleted validation samples and quarantines the shards in its engine *before* that
transaction commits (a failed commit errs on the safe side until the next sync), then forgets the
user's cached history and prompt caches. Only then is Redis asked to enqueue the retrains (or, with
no shard affected, a purge) and to tell the other replicas; if Redis is down the request still
stands, since the worker's reconciler finds every dirty shard in the ledger.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from sqlalchemy.orm import Session

from jobs import queue
from ledger import deletions
from ledger.models import DeletionRequest
from service.metrics import Metrics
from service.replica import Replica
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeletionService:
    settings: ServiceSettings
    replica: Replica
    redis: Redis
    metrics: Metrics

    def request(self, *, session: Session, user_id: str, item_ids: Sequence[str] | None, token_hmac: str,
                idempotency_key: str | None, received: float) -> DeletionRequest:
        """Forget ``user_id``'s interactions (all, or ``item_ids``); ``received``: ``time.perf_counter()``
        when the request arrived. A reused ``idempotency_key`` returns the first request as it stands."""
        outcome = deletions.request_deletion(
            session=session, user_id=user_id, item_ids=item_ids, key=self.settings.hmac_secret(),
            idempotency_key=idempotency_key, token_hmac=token_hmac)
        request = outcome.request
        if not outcome.created:
            return request
        self.replica.attention.drop(outcome.valid_sample_ids)
        with self.replica.quarantined_until_committed(request.affected_shards):  # before the commit: the safe side
            session.commit()
        self.replica.forget_user(user_id)
        self.metrics.time_to_quarantine.observe(time.perf_counter() - received)
        self.metrics.deletion_requests.labels(first_status=request.status).inc()
        self.wake_worker(request)
        return request

    def wake_worker(self, request: DeletionRequest) -> None:
        """Enqueue the retrains and publish the quarantine; if Redis is down the reconciler catches up."""
        settings = self.settings
        try:
            for shard in request.affected_shards:
                queue.enqueue_retrain(self.redis, settings, shard)
            if request.affected_shards:
                # the user by the ledger's HMAC only: other replicas drop their cached history with it
                queue.publish(self.redis, settings.redis_prefix, {
                    "type": "quarantine", "shards": list(request.affected_shards), "subject": request.subject_hmac})
            else:
                queue.enqueue_purge(self.redis, settings.redis_prefix)
        except Exception:
            log.warning("deletion %s recorded, but Redis is unavailable: the worker's reconciler will pick it up",
                        request.id, exc_info=True)
