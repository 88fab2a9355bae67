"""The CPU LoRA ops of plugins/vllm-cpu-lora against a per-token reference written out by hand.

The plugin needs only torch, so it is checked here in the project's environment; the real server
tests (tests/engines/test_vllm_server.py) run it inside vLLM.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

PLUGIN = Path(__file__).parents[2] / "plugins" / "vllm-cpu-lora" / "apa_vllm_cpu_lora" / "__init__.py"


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apa_vllm_cpu_lora", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Token t gets x[t] @ weights[indices[t]].T, or zeros without a LoRA (index -1): [tokens, out]."""
    out = torch.zeros(x.shape[0], weights.shape[-2])
    for t, index in enumerate(indices.tolist()):
        if index >= 0:
            out[t] = weights[index, 0] @ x[t]
    return out


TOKENS, IN, RANK, OUT, LORAS = 9, 12, 4, 10, 3
INDICES = torch.tensor([0, 0, 0, -1, -1, 2, 2, 1, 0])  # runs, a gap without LoRA, every slot


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(TOKENS, IN, generator=g), "a": torch.randn(LORAS, 1, RANK, IN, generator=g),
            "h": torch.randn(TOKENS, RANK, generator=g), "b": torch.randn(LORAS, 1, OUT, RANK, generator=g),
            "y": torch.randn(TOKENS, OUT + 5, generator=g)}


def test_shrink(ops: ModuleType, data: dict[str, torch.Tensor]) -> None:
    out = torch.full((TOKENS, RANK), 7.0)
    ops.bgmv_shrink(data["x"], data["a"], out, INDICES, 0.5)
    torch.testing.assert_close(out, 0.5 * reference(data["x"], data["a"], INDICES))


def test_expand_adds_or_writes(ops: ModuleType, data: dict[str, torch.Tensor]) -> None:
    expected = reference(data["h"], data["b"], INDICES)
    added = data["y"].clone()
    ops.bgmv_expand(data["h"], data["b"], added, INDICES, add_inputs=True)
    torch.testing.assert_close(added[:, :OUT], data["y"][:, :OUT] + expected)
    torch.testing.assert_close(added[:, OUT:], data["y"][:, OUT:])  # the model's padding is left alone
    written = data["y"].clone()
    ops.bgmv_expand(data["h"], data["b"], written, INDICES, add_inputs=False)
    torch.testing.assert_close(written[:, :OUT], expected)


@pytest.mark.parametrize("add", [True, False])
def test_expand_slice(ops: ModuleType, data: dict[str, torch.Tensor], add: bool) -> None:
    y = data["y"].clone()
    ops.bgmv_expand_slice(data["h"], data["b"], y, INDICES, 3, OUT, add)
    expected = data["y"].clone()
    expected[:, 3:3 + OUT] = (expected[:, 3:3 + OUT] if add else 0) + reference(data["h"], data["b"], INDICES)
    torch.testing.assert_close(y, expected)


def test_sgmv_ops_equal_the_bgmv_ops_on_exploded_indices(ops: ModuleType, data: dict[str, torch.Tensor]) -> None:
    lora, lengths = torch.tensor([0, -1, 2, 1, 0]), torch.tensor([3, 2, 2, 1, 1])  # INDICES as runs
    starts = torch.cumsum(lengths, 0) - lengths
    meta = (starts, lengths, lora, 5, 3, TOKENS)
    shrunk = torch.zeros(TOKENS, RANK)
    ops.sgmv_shrink(data["x"], data["a"], shrunk, *meta, 2.0)
    torch.testing.assert_close(shrunk, 2.0 * reference(data["x"], data["a"], INDICES))
    expanded = data["y"].clone()
    ops.sgmv_expand(data["h"], data["b"], expanded, *meta, True)
    torch.testing.assert_close(expanded[:, :OUT], data["y"][:, :OUT] + reference(data["h"], data["b"], INDICES))
    sliced = torch.zeros(TOKENS, OUT + 5)
    ops.sgmv_expand_slice(data["h"], data["b"], sliced, *meta, 5, OUT, False)
    torch.testing.assert_close(sliced[:, 5:], reference(data["h"], data["b"], INDICES))
