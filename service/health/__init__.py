"""``/healthz``, ``/readyz`` and ``/metrics``: its router, schemas and probes."""
