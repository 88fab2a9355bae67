"""Engines score prompts with per-sample shard weights, and hold the live (shard, version) adapters.

Chosen by name from ``ENGINES`` with ``create_engine``; ``torch`` is the default (CPU or CUDA), ``vllm``
a client of a vLLM server. Each entry imports its engine when called, so naming the registry loads no
engine's dependencies. See ``base.Engine`` for what every engine does.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from apa.engines.base import AdapterRef, Engine, ShardState
from apa.errors import ConfigError

if TYPE_CHECKING:
    from apa.model import BaseModel


def _torch(base: "BaseModel", **options: Any) -> Engine:
    from apa.engines.torch import TorchEngine

    return TorchEngine(base, **options)


def _vllm(base: "BaseModel", **options: Any) -> Engine:
    from apa.engines.vllm import VllmEngine

    return VllmEngine(base, **options)


ENGINES: dict[str, Callable[..., Engine]] = {"torch": _torch, "vllm": _vllm}


def create_engine(name: str, base: "BaseModel", **options: Any) -> Engine:
    """The engine registered as ``name`` over ``base`` (``options``: that engine's keyword arguments)."""
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    return factory(base, **options)


__all__ = ["ENGINES", "AdapterRef", "Engine", "ShardState", "create_engine"]
