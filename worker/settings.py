"""The worker process's settings (environment ``APA_*``), built on demand."""

from functools import lru_cache

from apa.settings import CoreSettings


class WorkerSettings(CoreSettings):
    device: str = "cpu"
    gate_max_auc_drop: float = 0.1  # see apa/gate.py
    reconcile_interval_s: float = 30.0
    nice: int = 10  # retraining yields the CPU to a gateway on the same machine
    lock_ttl_s: int = 60  # per-shard lock, extended while the retrain runs; a killed worker frees it
    worker_metrics_port: int = 0  # the worker's /metrics (worker/metrics.py); 0: none
    heartbeat_ttl_s: float = 15.0  # a worker counts as dead this long after its last beat (every ttl/3)
    # the reconciler's sweep leaves what changed more recently (worker/reconciler.py): a live writer renames
    # its temp folder and records its version within seconds
    stray_age_s: float = 10.0


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
