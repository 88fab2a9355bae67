"""The embedding cache keeps each batch as it finishes, so a long embedding that stops loses one batch."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import apa.model
from apa import prompts
from apa.embeddings import EmbeddingCache, cosine, embed
from apa.model import BaseModel
from tests.conftest import TITLES
from tests.support import near_tie


def test_an_interrupted_embedding_keeps_the_batches_it_finished(tiny_base: BaseModel, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    titles = list(TITLES.values())
    texts = [prompts.sample_prompt([a], [b], c) for a, b, c in zip(titles, titles[1:], titles[2:], strict=False)]
    cache = EmbeddingCache(tmp_path, tiny_base.sha256)
    real = apa.model.headed_last_hidden
    calls = []

    def dies_on_the_second_batch(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the machine went away")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(apa.model, "headed_last_hidden", dies_on_the_second_batch)
        with pytest.raises(KeyboardInterrupt):
            embed(tiny_base, texts, cache=cache, batch_size=4)
    kept = [t for t in texts if cache.get(t) is not None]
    assert len(texts) > 8 and len(kept) == 4  # the first batch

    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(apa.model, "headed_last_hidden", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        again = embed(tiny_base, texts, cache=cache, batch_size=4)
    assert len(calls) == -(-(len(texts) - 4) // 4)  # only what was missing ran
    np.testing.assert_allclose(again, embed(tiny_base, texts, batch_size=4), atol=1e-5)  # other batches


def test_cosine_keeps_a_gap_float32_rounds_away() -> None:
    float32 = near_tie.QUERY @ near_tie.ROWS.T
    assert float32[0, 0] == float32[0, 1]  # the tie the machine would break its own way
    sims = cosine(near_tie.QUERY, near_tie.ROWS)
    assert sims.dtype == np.float64
    assert sims[0, 1] - sims[0, 0] == 2.0**-24  # exact: every product of float32 inputs fits a float64
