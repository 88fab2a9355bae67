"""The torch engine against PEFT itself, on the tiny Llama in fp32: one-hot weights are PEFT's single
adapter, the ND mixture is PEFT's exact "cat" merge, APA(D) by hand on one linear layer.

Adapters are random LoRAs (r=4, alpha=16 on q_proj and v_proj) with non-zero ``lora_B``, so every
comparison below would fail if the engine dropped, mis-scaled or mis-ordered an adapter.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from apa.engines.base import AdapterRef
from apa.engines.mixture import MIXTURE, Mix, MixtureLoRALinear, Stack
from apa.engines.torch import TorchEngine
from apa.model import forward_last_hidden
from tests.conftest import engine_outputs, load_tiny
from tests.support.adapters import LOGIT_TOL, K, full_logits, one_hot, peft_outputs, peft_reference

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
