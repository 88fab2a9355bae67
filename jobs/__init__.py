"""What the gateway and the worker share about jobs: queue and key names, de-duplicated enqueueing by
task name, per-shard lock names, pub/sub events and the live-worker count. It imports neither side
(the gateway never imports ``worker``, the worker never imports ``service``) and no torch."""
