"""``/admin/*``: its router, schemas and use cases (status, a shard's retrain retried)."""
