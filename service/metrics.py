"""Prometheus metrics of one app (own registry, so several apps can live in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("apa_request_seconds", "HTTP request latency", ["method", "route", "status"],
                                 registry=self.registry)
        self.predictions = Counter("apa_predictions_total", "Items scored", ["fallback"], registry=self.registry)
        self.deletions = Gauge("apa_deletions", "Deletion requests by status (from the ledger)", ["status"],
                               registry=self.registry)
        self.deletion_requests = Counter("apa_deletion_requests_total", "DELETE requests accepted",
                                         ["first_status"], registry=self.registry)
        self.time_to_quarantine = Histogram(
            "apa_time_to_quarantine_seconds", "DELETE received -> its shards quarantined on this replica",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=self.registry)
        self.time_to_forget = Histogram(
            "apa_time_to_forget_seconds", "Deletion created -> completed (retrained version serving)",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200), registry=self.registry)
        self.history_cache = Counter("apa_history_cache_total", "History-embedding lookups", ["result"],
                                     registry=self.registry)
        self.prefix_cache = Gauge("apa_prefix_cache", "Prefix cache across requests: hits and misses since "
                                  "start, entries, bytes, capacity_bytes", ["stat"], registry=self.registry)
        self.shed = Counter("apa_recommend_shed_total", "/recommend answered 503: a deletion's retrain is owed "
                            "the machine (service/deadline.py)", registry=self.registry)
        self.forget_deadline = Gauge("apa_forget_deadline_seconds", "APA_FORGET_DEADLINE_S", registry=self.registry)
        self.forget_waited = Gauge("apa_forget_oldest_open_seconds",
                                   "How long the oldest open deletion has waited (0: none open)",
                                   registry=self.registry)
        self.forget_overdue = Gauge("apa_forget_overdue", "Open deletions past APA_FORGET_DEADLINE_S (alert on > 0)",
                                    registry=self.registry)
        self.forget_stance = Gauge("apa_forget_stance", "Serving's stance toward owed retrains: 0 normal, "
                                   "1 yielding the model thread, 2 shedding /recommend", registry=self.registry)
        self.completed_overdue = Counter("apa_deletions_completed_overdue_total",
                                         "Deletions this replica saw complete after APA_FORGET_DEADLINE_S",
                                         registry=self.registry)
        self.ingested = Counter("apa_ingested_total", "Ingestion: interactions accepted and duplicates refused, "
                                "samples by split", ["what"], registry=self.registry)
        self.batches = Counter("apa_forward_batches_total", "Micro-batches run on the model thread", ["kind"],
                               registry=self.registry)
