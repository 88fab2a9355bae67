"""Engines score prompts with per-sample shard weights, and hold the live (shard, version) adapters.

Chosen by name from ``ENGINES``; ``torch`` is the default (CPU or CUDA). See ``base.Engine``.
"""

from apa.engines.base import AdapterRef, Engine, ShardState

__all__ = ["AdapterRef", "Engine", "ShardState"]
