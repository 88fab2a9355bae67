"""Prefix-shared scoring: one user's candidates, their common prefix run once, equal to full forwards."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import apa.engines.torch as torch_engine
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.errors import AdapterMismatch
from apa.model import BaseModel, forward_last_hidden
from tests.support.adapters import LOGIT_TOL, SAME_ATOL, SHARED_TOL, K, peft_outputs, peft_reference


def test_shared_prefix_length_by_hand() -> None:
    from apa.model import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every prompt keeps its last token
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2


def test_candidates_share_most_of_their_tokens(tiny_base: BaseModel, candidates: list[str]) -> None:
    from apa.model import shared_prefix_length, token_ids

    ids = token_ids(tiny_base.tokenizer, candidates)
    cut = shared_prefix_length(ids)
    assert cut > 0.8 * min(map(len, ids))
    assert len({len(x) - cut for x in ids}) >= 3  # suffixes of different lengths: padded batches


@pytest.mark.parametrize("mode", ["nd", "d"])
def test_shared_prefix_equals_full_forwards(engine: TorchEngine, candidates: list[str], mode: str) -> None:
    w = np.array([0.5, 0.3, 0.2])
    plain = engine.score(candidates, np.tile(w, (len(candidates), 1)), mode=mode, batch_size=4)  # type: ignore[arg-type]
    shared = engine.score_shared(candidates, w, mode=mode, batch_size=4)  # type: ignore[arg-type]
    np.testing.assert_allclose(shared, plain, atol=SHARED_TOL, rtol=0.0)
    assert np.ptp(plain) > 1e-3  # the targets matter: a wrong suffix readout could not pass


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_shared_prefix_is_independent_of_the_suffix_batching(
    engine: TorchEngine, candidates: list[str], batch_size: int
) -> None:
    w = np.array([0.1, 0.2, 0.7])
    plain = engine.score(candidates, np.tile(w, (len(candidates), 1)), batch_size=1)
    np.testing.assert_allclose(engine.score_shared(candidates, w, batch_size=batch_size), plain,
                               atol=SHARED_TOL, rtol=0.0)


def test_shared_prefix_uses_the_effective_weights_under_quarantine(
    engine: TorchEngine, candidates: list[str]
) -> None:
    w = np.array([0.5, 0.3, 0.2])
    engine.quarantine(0)
    shared = engine.score_shared(candidates, w)
    engine.release(0)
    expected = engine.score(candidates, np.tile([0.0, 0.6, 0.4], (len(candidates), 1)))
    np.testing.assert_allclose(shared, expected, atol=SHARED_TOL, rtol=0.0)


@pytest.mark.parametrize("shard", [0, 2])
def test_shared_prefix_one_hot_equals_peft(
    engine: TorchEngine, adapter_dirs: list[Path], tiny_model_dir: Path, candidates: list[str], shard: int
) -> None:
    ref_base, ref_model = peft_reference(tiny_model_dir, adapter_dirs[shard])
    _, ref_p = peft_outputs(ref_base, ref_model, candidates)
    np.testing.assert_allclose(engine.score_shared(candidates, np.eye(K)[shard]), ref_p, atol=LOGIT_TOL, rtol=0.0)


def test_shared_prefix_edge_cases(engine: TorchEngine, candidates: list[str], texts: list[str]) -> None:
    w = np.array([0.2, 0.2, 0.6])
    one = engine.score_shared(candidates[:1], w)  # a single prompt: all but its last token is "shared"
    np.testing.assert_allclose(one, engine.score(candidates[:1], w[None, :]), atol=SHARED_TOL, rtol=0.0)
    mixed = [*texts, *candidates[:3]]  # different histories: only the template's start is common
    np.testing.assert_allclose(engine.score_shared(mixed, w), engine.score(mixed, np.tile(w, (len(mixed), 1))),
                               atol=SHARED_TOL, rtol=0.0)
    assert engine.score_shared([], w).shape == (0,)
    with pytest.raises(AdapterMismatch):
        engine.score_shared(candidates, np.ones((len(candidates), K)) / K)


def test_shared_prefix_keeps_one_stack_through_a_swap(
    engine: TorchEngine, adapter_dirs: list[Path], candidates: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap that lands between the prefix and the suffixes changes nothing in the call under way."""
    w = np.array([0.6, 0.3, 0.1])
    old = engine.score_shared(candidates, w)
    real = torch_engine.packed_last_hidden

    def swap_midway(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        engine.load_shard(AdapterRef(shard=0, version=2, path=adapter_dirs[K]))  # after the first batch
        return out

    monkeypatch.setattr(torch_engine, "packed_last_hidden", swap_midway)
    during = engine.score_shared(candidates, w, batch_size=4)
    monkeypatch.undo()
    after = engine.score_shared(candidates, w)
    np.testing.assert_allclose(during, old, atol=SAME_ATOL, rtol=0.0)
    assert np.abs(after - old).max() > 1e-3  # the new version is live for the next call


def test_packed_rows_of_different_prompt_groups_in_one_forward(
    tiny_base: BaseModel, texts: list[str], candidates: list[str]
) -> None:
    """Rows of different lengths, one with its prefix cached, one running its prefix, one without a
    prefix: each row's answers equal its prompts' full forwards."""
    from apa.model import PackedRow, packed_last_hidden, shared_prefix_length, token_ids

    net, device = tiny_base.model, tiny_base.device
    groups = [candidates[:4], texts[:3], candidates[5:7]]
    ids = [token_ids(tiny_base.tokenizer, g) for g in groups]
    cuts = [shared_prefix_length(x) for x in ids]
    [(_, cached)] = packed_last_hidden(net, [PackedRow(prefix=ids[0][0][:cuts[0]], suffixes=[])], device)
    rows = [PackedRow(prefix=ids[0][0][:cuts[0]], suffixes=[x[cuts[0]:] for x in ids[0]], cached=cached),
            PackedRow(prefix=ids[1][0][:cuts[1]], suffixes=[x[cuts[1]:] for x in ids[1]]),
            PackedRow(prefix=(), suffixes=ids[2])]
    out = packed_last_hidden(net, rows, device)
    for group, (hidden, _) in zip(groups, out, strict=True):
        np.testing.assert_allclose(hidden.float().cpu(), forward_last_hidden(tiny_base, group, batch_size=1),
                                   atol=SHARED_TOL, rtol=0.0)
    assert out[0][1] is cached  # a cached row hands its cache back
    [(_, alone)] = packed_last_hidden(net, [PackedRow(prefix=rows[1].prefix, suffixes=[])], device)
    for (keys, values), (keys_alone, values_alone) in zip(out[1][1], alone, strict=True):
        assert keys.shape == keys_alone.shape == (1, keys.shape[1], cuts[1], keys.shape[3])
        torch.testing.assert_close(keys, keys_alone, atol=SHARED_TOL, rtol=0.0)
        torch.testing.assert_close(values, values_alone, atol=SHARED_TOL, rtol=0.0)


def test_the_template_head_is_computed_once_and_changes_no_embedding(
    tiny_base: BaseModel, texts: list[str], candidates: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from apa import model as model_module
    from apa import prompts
    from apa.embeddings import embed, template_head
    from apa.model import token_ids

    head = template_head(tiny_base, "movie")
    assert template_head(tiny_base, "movie") is head
    other_users = [prompts.history_prompt(["Zebra Crossing (1999)"], ["Q"]), prompts.history_prompt([], []), *texts]
    for ids in token_ids(tiny_base.tokenizer, other_users):  # the template's text only: the same for anyone
        assert ids[:len(head.prefix)] == list(head.prefix)
    assert template_head(tiny_base, "book").prefix != head.prefix

    packed = []
    real = model_module.packed_last_hidden
    monkeypatch.setattr(model_module, "packed_last_hidden", lambda *a, **k: packed.append(len(a[1])) or real(*a, **k))
    mixed = [*texts, "no template here", *candidates[:3]]
    np.testing.assert_allclose(embed(tiny_base, mixed, batch_size=4), forward_last_hidden(tiny_base, mixed).numpy(),
                               atol=SHARED_TOL, rtol=0.0)
    assert sum(packed) == len(mixed) - 1  # every templated prompt ran against the head, 4 rows at most at once
    assert max(packed) == 4
