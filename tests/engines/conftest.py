"""The engines' fixtures: K random shard adapters (and a second version of shard 0), an engine over them,
prompts of different lengths, and one user's candidates."""

from pathlib import Path

import pytest

from apa.data import Dataset
from apa.engines.torch import TorchEngine
from apa.model import BaseModel
from apa.samples import build_samples
from tests.support.adapters import K, make_adapter, refs


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """K shard adapters, then one more (index K) used as a second version of shard 0."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=100 + i) for i in range(K + 1)]


@pytest.fixture
def engine(tiny_base: BaseModel, adapter_dirs: list[Path]) -> TorchEngine:
    eng = TorchEngine(tiny_base)
    eng.load(refs(adapter_dirs[:K]))
    return eng


@pytest.fixture
def texts(dataset: Dataset) -> list[str]:
    """Six prompts of different lengths (history 1..6 items), so batches are padded."""
    samples = build_samples(dataset)
    chosen = [s for s in samples if s.user_id == "u2"][:6]
    assert len({len(s.history_item_ids) for s in chosen}) == 6
    return [s.prompt(dataset.titles) for s in chosen]


@pytest.fixture
def candidates(dataset: Dataset) -> list[str]:
    """One user's history and every title as the target: suffixes of 5 to 9 tokens, prefix shared."""
    from apa import prompts

    titles = list(dataset.titles.values())
    return [prompts.sample_prompt(titles[:3], titles[3:5], t) for t in titles]
