"""Atomic version swaps under concurrent scoring, the model outside ``score``, and loading errors."""

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from apa.engines.base import AdapterRef
from apa.engines.mixture import MixtureLoRALinear
from apa.engines.torch import TorchEngine
from apa.errors import AdapterMismatch
from apa.model import BaseModel, forward_last_hidden
from tests.conftest import load_tiny
from tests.support.adapters import (
    K,
    make_adapter,
    one_hot,
    refs,
)

# -- (e) atomic swaps under concurrent scoring -----------------------------------------------------

def test_load_shard_swap_is_atomic_under_concurrent_scoring(
    engine: TorchEngine, adapter_dirs: list[Path], texts: list[str]
) -> None:
    weights = np.tile([0.6, 0.3, 0.1], (len(texts), 1))
    v1 = AdapterRef(shard=0, version=1, path=adapter_dirs[0])
    v2 = AdapterRef(shard=0, version=2, path=adapter_dirs[K])
    old = engine.score(texts, weights, batch_size=1)
    engine.load_shard(v2)
    new = engine.score(texts, weights, batch_size=1)
    engine.load_shard(v1)
    assert np.abs(old - new).min() > 1e-3  # every prompt tells the versions apart

    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    done = threading.Event()
    swaps = 0

    def scorer() -> None:
        try:
            for _ in range(8):
                results.append(engine.score(texts, weights, batch_size=1))  # 6 batches per call
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def swapper() -> None:
        nonlocal swaps
        try:
            while not done.is_set():
                engine.load_shard(v2 if swaps % 2 == 0 else v1)
                swaps += 1
        except BaseException as exc:
            errors.append(exc)

    scorers = [threading.Thread(target=scorer) for _ in range(3)]
    swap_thread = threading.Thread(target=swapper)
    swap_thread.start()
    for t in scorers:
        t.start()
    for t in scorers:
        t.join(timeout=120)
    done.set()
    swap_thread.join(timeout=60)

    assert not errors, errors
    assert len(results) == 24
    assert swaps >= 2
    for result in results:
        matches_old = np.allclose(result, old, atol=1e-6, rtol=0.0)
        matches_new = np.allclose(result, new, atol=1e-6, rtol=0.0)
        assert matches_old != matches_new, f"a call mixed versions: {result} vs old {old} / new {new}"
    assert (engine.live()[0].shard, engine.live()[0].version) == (0, 1 if swaps % 2 == 0 else 2)


def test_swap_keeps_quarantine_and_reports_versions(engine: TorchEngine, adapter_dirs: list[Path]) -> None:
    engine.quarantine(1)
    engine.load_shard(AdapterRef(shard=0, version=2, path=adapter_dirs[K]))
    assert [(s.shard, s.version, s.active) for s in engine.live()] == [(0, 2, True), (1, 1, False), (2, 1, True)]
    with pytest.raises(AdapterMismatch):
        engine.load_shard(AdapterRef(shard=K, version=1, path=adapter_dirs[0]))


def test_swapping_several_shards_never_rereads_the_unchanged_ones(
    tiny_base: BaseModel, tiny_model_dir: Path, adapter_dirs: list[Path], texts: list[str], tmp_path: Path,
) -> None:
    """A superseded version is purged once its successor serves; a replica that swaps two shards must
    not need the old folder of either (it keeps their tensors) nor swap them one at a time."""
    import shutil

    copies = [Path(shutil.copytree(p, tmp_path / f"v1-{k}")) for k, p in enumerate(adapter_dirs[:K])]
    engine = TorchEngine(tiny_base)
    engine.load(refs(copies))
    second = make_adapter(tiny_model_dir, tmp_path / "v2-1", seed=7)
    for folder in copies:
        shutil.rmtree(folder)  # every v1 is purged
    engine.load_shards([AdapterRef(shard=0, version=2, path=adapter_dirs[K]), AdapterRef(shard=1, version=2,
                                                                                     path=second)])
    assert [(s.shard, s.version) for s in engine.live()] == [(0, 2), (1, 2), (2, 1)]
    fresh = TorchEngine(load_tiny(tiny_model_dir))
    fresh.load([AdapterRef(shard=0, version=2, path=adapter_dirs[K]), AdapterRef(shard=1, version=2, path=second),
                AdapterRef(shard=2, version=1, path=adapter_dirs[2])])
    weights = np.full((len(texts), K), 1.0 / K)
    np.testing.assert_allclose(engine.score(texts, weights), fresh.score(texts, weights), atol=1e-6, rtol=0)


# -- (f) outside score the model is the base model -------------------------------------------------

def test_outside_score_the_model_is_the_base_model(
    engine: TorchEngine, tiny_model_dir: Path, texts: list[str]
) -> None:
    reference = forward_last_hidden(load_tiny(tiny_model_dir), texts)
    engine.score(texts, np.full((len(texts), K), 1 / K))
    assert any(isinstance(m, MixtureLoRALinear) for m in engine.base.model.modules())
    torch.testing.assert_close(forward_last_hidden(engine.base, texts), reference, atol=0.0, rtol=0.0)

    # ... also while another thread is inside score (the mixture is per thread of execution)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            engine.score(texts, np.full((len(texts), K), 1 / K), batch_size=2)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        for _ in range(3):
            torch.testing.assert_close(forward_last_hidden(engine.base, texts), reference, atol=0.0, rtol=0.0)
    finally:
        stop.set()
        thread.join(timeout=60)


# -- loading errors ----------------------------------------------------------------------------------

def test_loading_errors(
    tiny_base: BaseModel, tiny_model_dir: Path, adapter_dirs: list[Path], tmp_path: Path, texts: list[str]
) -> None:
    eng = TorchEngine(tiny_base)
    assert eng.live() == []
    with pytest.raises(AdapterMismatch):
        eng.score(texts, one_hot(len(texts), 1, 0))
    with pytest.raises(AdapterMismatch):
        eng.load_shard(AdapterRef(shard=0, version=1, path=adapter_dirs[0]))
    with pytest.raises(AdapterMismatch, match=re.escape("0..K-1")):
        eng.load([AdapterRef(shard=1, version=1, path=adapter_dirs[0])])
    other_rank = make_adapter(tiny_model_dir, tmp_path / "r8", seed=5, r=8)
    with pytest.raises(AdapterMismatch, match="same rank"):
        eng.load([AdapterRef(shard=0, version=1, path=adapter_dirs[0]),
                  AdapterRef(shard=1, version=1, path=other_rank)])
    eng.load(refs(adapter_dirs[:2]))
    with pytest.raises(AdapterMismatch, match="weights shape"):
        eng.score(texts, one_hot(len(texts), 3, 0))
