"""The torch engine against PEFT itself, on the tiny Llama in fp32.

Adapters are random LoRAs (r=4, alpha=16 on q_proj and v_proj) with non-zero ``lora_B``, so every
comparison below would fail if the engine dropped, mis-scaled or mis-ordered an adapter.
"""

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import apa.engines.torch as torch_engine
from apa.data import Dataset
from apa.engines.base import AdapterRef, effective_weights
from apa.engines.mixture import MIXTURE, Mix, MixtureLoRALinear, Stack
from apa.engines.torch import TorchEngine
from apa.errors import AdapterMismatch, AllShardsQuarantined
from apa.model import BaseModel, forward_last_hidden, score_hidden
from apa.samples import build_samples
from tests.conftest import engine_outputs, load_tiny

K = 3
R = 4
ALPHA = 16
LOGIT_TOL = 1e-4
SAME_ATOL = 1e-6  # one engine, same effective weights: equal up to float noise


def make_adapter(model_dir: Path, folder: Path, seed: int, r: int = R) -> Path:
    """A PEFT LoRA with random A and B (B is zero at init; here it is not), saved PEFT's way."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_tiny(model_dir).model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """K shard adapters, then one more (index K) used as a second version of shard 0."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=100 + i) for i in range(K + 1)]


def refs(paths: list[Path]) -> list[AdapterRef]:
    return [AdapterRef(shard=k, version=1, path=p) for k, p in enumerate(paths)]


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


def peft_reference(model_dir: Path, adapter: Path) -> tuple[BaseModel, Any]:
    from peft import PeftModel

    base = load_tiny(model_dir)
    model = PeftModel.from_pretrained(base.model, str(adapter))
    model.eval()
    return base, model


def peft_outputs(base: BaseModel, model: Any, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """PEFT's last hidden states [n, hidden] and p(yes) [n]."""
    hidden = forward_last_hidden(base, texts, batch_size=4, model=model)
    return hidden, score_hidden(base, hidden, model=model).numpy()


def full_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """All-vocabulary logits at the last prompt token: [n, vocab]."""
    with torch.no_grad():
        return model.get_output_embeddings()(hidden)


def one_hot(n: int, k: int, shard: int) -> np.ndarray:
    return np.eye(k)[[shard] * n]


# -- (a) one-hot weights reproduce PEFT's single adapter -------------------------------------------

@pytest.mark.parametrize("shard", range(K))
def test_one_hot_equals_peft_single_adapter(
    engine: TorchEngine, adapter_dirs: list[Path], tiny_model_dir: Path, texts: list[str], shard: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hidden, p = engine_outputs(engine, texts, one_hot(len(texts), K, shard), monkeypatch)
    ref_base, ref_model = peft_reference(tiny_model_dir, adapter_dirs[shard])
    ref_hidden, ref_p = peft_outputs(ref_base, ref_model, texts)

    torch.testing.assert_close(hidden, ref_hidden, atol=LOGIT_TOL, rtol=0.0)
    torch.testing.assert_close(full_logits(engine.base.model, hidden), full_logits(ref_model, ref_hidden),
                               atol=LOGIT_TOL, rtol=0.0)
    np.testing.assert_allclose(p, ref_p, atol=LOGIT_TOL, rtol=0.0)

    # the adapter matters: the plain base model is far from both
    base_hidden = forward_last_hidden(load_tiny(tiny_model_dir), texts)
    assert (base_hidden - ref_hidden).abs().max() > 0.05


def test_peft_reference_matches_a_full_forward(
    adapter_dirs: list[Path], tiny_model_dir: Path, texts: list[str]
) -> None:
    """The last-token readout used above equals PEFT's own full forward at the last real token."""
    ref_base, ref_model = peft_reference(tiny_model_dir, adapter_dirs[0])
    hidden, _ = peft_outputs(ref_base, ref_model, texts)
    enc = ref_base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = ref_model(**enc).logits  # [n, seq, vocab]
    last = enc["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(logits[torch.arange(len(texts)), last], full_logits(ref_model, hidden),
                               atol=LOGIT_TOL, rtol=0.0)


# -- (b) weighted ND mixture = PEFT's exact "cat" merge ---------------------------------------------

@pytest.mark.parametrize("mix", [[1 / K] * K, [0.6, 0.3, 0.1]])
def test_nd_mixture_equals_peft_cat_merge(
    engine: TorchEngine, adapter_dirs: list[Path], tiny_model_dir: Path, texts: list[str], mix: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import PeftModel

    ref_base = load_tiny(tiny_model_dir)
    names = [f"s{k}" for k in range(K)]
    ref_model = PeftModel.from_pretrained(ref_base.model, str(adapter_dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:K], strict=True):
        ref_model.load_adapter(str(path), adapter_name=name)
    ref_model.add_weighted_adapter(names, weights=mix, adapter_name="cat", combination_type="cat")
    ref_model.set_adapter("cat")
    ref_model.eval()
    ref_hidden, ref_p = peft_outputs(ref_base, ref_model, texts)

    weights = np.tile(mix, (len(texts), 1))
    hidden, p = engine_outputs(engine, texts, weights, monkeypatch, mode="nd")
    torch.testing.assert_close(full_logits(engine.base.model, hidden), full_logits(ref_model, ref_hidden),
                               atol=LOGIT_TOL, rtol=0.0)
    np.testing.assert_allclose(p, ref_p, atol=LOGIT_TOL, rtol=0.0)


def test_per_sample_weights_are_independent_of_batch_neighbours(
    engine: TorchEngine, texts: list[str]
) -> None:
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(K), size=len(texts))
    together = engine.score(texts, weights, batch_size=len(texts))
    alone = np.array([engine.score([t], w[None, :], batch_size=1)[0] for t, w in zip(texts, weights, strict=True)])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0.0)


# -- (c) quarantine ---------------------------------------------------------------------------------

def test_quarantine_equals_zeroed_renormalised_weights(
    engine: TorchEngine, tiny_base: BaseModel, adapter_dirs: list[Path], texts: list[str]
) -> None:
    weights = np.random.default_rng(1).dirichlet(np.ones(K), size=len(texts))  # [n, K]
    for j in range(K):
        expected_w = weights.copy()
        expected_w[:, j] = 0.0
        expected_w /= expected_w.sum(axis=1, keepdims=True)
        expected = engine.score(texts, expected_w)
        engine.quarantine(j)
        try:
            np.testing.assert_allclose(engine.score(texts, weights), expected, atol=SAME_ATOL, rtol=0.0)
            assert [s.active for s in engine.live()] == [k != j for k in range(K)]
        finally:
            engine.release(j)
    assert all(s.active for s in engine.live())


def test_quarantine_one_hot_on_a_clean_shard_equals_an_engine_without_the_shard(
    engine: TorchEngine, tiny_model_dir: Path, adapter_dirs: list[Path], texts: list[str]
) -> None:
    engine.quarantine(0)
    served = engine.score(texts, one_hot(len(texts), K, 1))
    without = TorchEngine(load_tiny(tiny_model_dir))
    without.load(refs(adapter_dirs[1:K]))  # old shards 1, 2 renumbered 0, 1
    np.testing.assert_allclose(served, without.score(texts, one_hot(len(texts), K - 1, 0)), atol=1e-5, rtol=0.0)


def test_quarantined_shard_with_all_the_weight_falls_back_to_uniform_over_clean_shards(
    engine: TorchEngine, texts: list[str]
) -> None:
    engine.quarantine(2)
    fallback = engine.score(texts, one_hot(len(texts), K, 2))
    np.testing.assert_allclose(fallback, engine.score(texts, np.tile([0.5, 0.5, 0.0], (len(texts), 1))),
                               atol=SAME_ATOL, rtol=0.0)


def test_effective_weights_by_hand() -> None:
    weights = np.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [-1.0, 1.0, 1.0]])
    got = effective_weights(weights, frozenset({0, 1}))
    np.testing.assert_allclose(got, [[0.4, 0.6, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], atol=1e-12)
    with pytest.raises(AllShardsQuarantined):
        effective_weights(weights, frozenset())


def test_all_quarantined_refuses_to_score(engine: TorchEngine, texts: list[str]) -> None:
    for k in range(K):
        engine.quarantine(k)
    with pytest.raises(AllShardsQuarantined):
        engine.score(texts, one_hot(len(texts), K, 0))
    engine.release(1)
    assert engine.score(texts, one_hot(len(texts), K, 0)).shape == (len(texts),)


# -- (d) APA(D) by hand on one linear layer -----------------------------------------------------------

def _hand_stack(k: int, r: int, d_in: int, d_out: int) -> tuple[Stack, list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    a_blocks = [torch.randn(r, d_in, generator=gen, dtype=torch.float64) for _ in range(k)]
    b_blocks = [torch.randn(d_out, r, generator=gen, dtype=torch.float64) for _ in range(k)]
    stack = Stack(
        adapters=tuple(AdapterRef(shard=s, version=1, path=Path(f"/nowhere/{s}")) for s in range(k)),
        r=r,
        modules={"lin": (torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1))},  # [K*r, in], [out, K*r]
    )
    return stack, a_blocks, b_blocks


def _run_mixture(layer: MixtureLoRALinear, x: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    token = MIXTURE.set(mix)
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        MIXTURE.reset(token)


def test_mixture_linear_d_and_nd_by_hand() -> None:
    k, r, d_in, d_out = 3, 2, 5, 4
    stack, a_blocks, b_blocks = _hand_stack(k, r, d_in, d_out)
    linear = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = MixtureLoRALinear(linear, "lin")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, d_in, generator=gen, dtype=torch.float64)  # [batch, seq, in]
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.0, 0.9]], dtype=torch.float64)  # [batch, K]

    with torch.no_grad():
        y = linear(x)
        for b in range(2):
            a_mix = torch.stack([w[b, j] * a_blocks[j] for j in range(k)]).sum(dim=0)  # [r, in]
            b_mix = torch.stack([w[b, j] * b_blocks[j] for j in range(k)]).sum(dim=0)  # [out, r]
            delta_nd = torch.stack([w[b, j] * b_blocks[j] @ a_blocks[j] for j in range(k)]).sum(dim=0)  # [out, in]
            got_d = _run_mixture(layer, x, Mix(stack=stack, weights=w, mode="d"))
            got_nd = _run_mixture(layer, x, Mix(stack=stack, weights=w, mode="nd"))
            torch.testing.assert_close(got_d[b], y[b] + x[b] @ a_mix.T @ b_mix.T, atol=1e-12, rtol=0.0)
            torch.testing.assert_close(got_nd[b], y[b] + x[b] @ delta_nd.T, atol=1e-12, rtol=0.0)
        assert (got_d - got_nd).abs().max() > 1e-3  # the two modes really differ off one-hot

        one_hot_w = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
        got_d = _run_mixture(layer, x, Mix(stack=stack, weights=one_hot_w, mode="d"))
        got_nd = _run_mixture(layer, x, Mix(stack=stack, weights=one_hot_w, mode="nd"))
        torch.testing.assert_close(got_d, got_nd, atol=1e-12, rtol=0.0)
        torch.testing.assert_close(got_nd[0], y[0] + x[0] @ (b_blocks[1] @ a_blocks[1]).T, atol=1e-12, rtol=0.0)

        # no mixture set, or a mixture for other modules: exactly the base layer
        torch.testing.assert_close(_run_mixture(layer, x, None), y, atol=0.0, rtol=0.0)
        other = MixtureLoRALinear(linear, "elsewhere")
        torch.testing.assert_close(_run_mixture(other, x, Mix(stack=stack, weights=w, mode="nd")), y,
                                   atol=0.0, rtol=0.0)


@pytest.mark.parametrize("shard", [0, 2])
def test_engine_d_equals_nd_for_one_hot(engine: TorchEngine, texts: list[str], shard: int) -> None:
    weights = one_hot(len(texts), K, shard)
    np.testing.assert_allclose(engine.score(texts, weights, mode="d"), engine.score(texts, weights, mode="nd"),
                               atol=1e-5, rtol=0.0)


def test_engine_d_differs_from_nd_for_mixed_weights(engine: TorchEngine, texts: list[str]) -> None:
    weights = np.full((len(texts), K), 1 / K)
    assert np.abs(engine.score(texts, weights, mode="d") - engine.score(texts, weights, mode="nd")).max() > 1e-4


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


# -- (f) prefix-shared scoring: one user's candidates, the common prefix run once ------------------------

SHARED_TOL = 1e-5  # fp32: the prefix once vs inside every full forward


@pytest.fixture
def candidates(dataset: Dataset) -> list[str]:
    """One user's history and every title as the target: suffixes of 5 to 9 tokens, prefix shared."""
    from apa import prompts

    titles = list(dataset.titles.values())
    return [prompts.sample_prompt(titles[:3], titles[3:5], t) for t in titles]


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
    from apa.model import PackedRow, forward_last_hidden, packed_last_hidden, shared_prefix_length, token_ids

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
    from apa.model import forward_last_hidden, token_ids

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


def test_prefix_cache_by_hand() -> None:
    from apa.engines.prefix_cache import PrefixCache, PrefixKey

    def key(i: int) -> PrefixKey:
        return PrefixKey(tokens=(i,), weights=(1.0, 0.0), mode="nd", versions=((0, 1), (1, 1)))

    states = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]  # 2 x 8 floats: 64 bytes
    cache = PrefixCache(capacity_bytes=150)
    cache.put(key(1), states, generation=0)
    cache.put(key(2), states, generation=0)
    assert cache.get(key(1)) is states  # 1 is now the most recent
    cache.put(key(3), states, generation=0)  # 192 bytes > 150: the least recently used (2) goes
    assert cache.get(key(2)) is None and cache.get(key(3)) is states
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 1, 2, 128)
    assert cache.drop(lambda k: k.tokens == (1,)) == 1 and len(cache) == 1
    cache.put(key(4), states, generation=0)  # computed before that drop: refused
    assert cache.get(key(4)) is None
    cache.put(key(4), states, generation=cache.generation)
    assert cache.get(key(4)) is states
    off = PrefixCache(capacity_bytes=0)
    off.put(key(1), states, generation=0)
    assert len(off) == 0


def test_prefix_cache_across_calls_is_exact_and_dropped_when_stale(
    tiny_base: BaseModel, adapter_dirs: list[Path], candidates: list[str]
) -> None:
    engine = TorchEngine(tiny_base, prefix_cache_bytes=2**24)
    engine.load(refs(adapter_dirs[:K]))
    w = np.array([0.5, 0.3, 0.2])
    first = engine.score_shared(candidates, w)
    again = engine.score_shared(candidates[3:], w)  # same user, fewer candidates: same prefix
    np.testing.assert_allclose(again, first[3:], atol=SHARED_TOL, rtol=0.0)
    assert (engine.prefixes.stats().hits, engine.prefixes.stats().misses) == (1, 1)
    engine.score_shared(candidates, np.array([0.0, 0.0, 1.0]))  # other weights: another entry
    assert len(engine.prefixes) == 2

    engine.quarantine(0)  # only the entry that used shard 0 goes
    assert [k.weights for k in engine.prefixes._entries] == [(0.0, 0.0, 1.0)]
    np.testing.assert_allclose(engine.score_shared(candidates, w),
                               engine.score(candidates, np.tile([0.0, 0.6, 0.4], (len(candidates), 1))),
                               atol=SHARED_TOL, rtol=0.0)
    engine.release(0)
    engine.load_shard(AdapterRef(shard=2, version=2, path=adapter_dirs[K]))  # a swap: old versions go
    assert len(engine.prefixes) == 0
    np.testing.assert_allclose(engine.score_shared(candidates, w),
                               engine.score(candidates, np.tile(w, (len(candidates), 1))), atol=SHARED_TOL, rtol=0.0)


def test_engines_are_built_by_name_and_forget_their_cached_prompts(
    tiny_base: BaseModel, adapter_dirs: list[Path], candidates: list[str]
) -> None:
    from apa.engines import ENGINES, create_engine
    from apa.errors import ConfigError

    assert "torch" in ENGINES
    with pytest.raises(ConfigError, match="unknown engine"):
        create_engine("no-such-engine", tiny_base)
    engine = create_engine("torch", tiny_base, prefix_cache_bytes=2**24)
    assert isinstance(engine, TorchEngine)
    engine.load(refs(adapter_dirs[:K]))
    engine.score_shared(candidates, np.array([0.5, 0.3, 0.2]))
    assert engine.cache_stats()["entries"] == 1 and engine.cache_stats()["misses"] == 1
    engine.drop_cached()  # what a deletion asks of every engine
    assert engine.cache_stats()["entries"] == 0 and engine.cache_stats()["bytes"] == 0
