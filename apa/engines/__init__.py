"""Engines score prompts with per-sample shard weights, and hold the live (shard, version) adapters.

Chosen by name from ``ENGINES`` (each entry builds one from the base model and its own keyword
options); ``torch`` is the default (CPU or CUDA), ``vllm`` a client of a vLLM server. See ``base.Engine``.
"""

from collections.abc import Callable
from typing import Any

from apa.engines.base import AdapterRef, Engine, ShardState
from apa.model import BaseModel


def _torch(base: BaseModel, **options: Any) -> Engine:
    from apa.engines.torch import TorchEngine

    return TorchEngine(base, **options)


def _vllm(base: BaseModel, **options: Any) -> Engine:
    from apa.engines.vllm import VllmEngine

    return VllmEngine(base, **options)


ENGINES: dict[str, Callable[..., Engine]] = {"torch": _torch, "vllm": _vllm}

__all__ = ["ENGINES", "AdapterRef", "Engine", "ShardState"]
