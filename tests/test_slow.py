"""The real base model (SmolLM2-135M-Instruct, fp32): answer tokens, two training steps, engine = PEFT.

Needs ``apa assets fetch``. Outside CI a missing asset skips the test; in CI (``$CI`` set) it fails.
"""

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from apa.data import movielens_100k
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.model import forward_last_hidden, load_base_model, score_hidden
from apa.samples import build_samples, split_samples
from apa.training import TrainConfig, save_adapter, train_adapter
from tests.conftest import engine_outputs

REPO = Path(__file__).resolve().parents[1]
YES_ID, NO_ID = 10539, 5230


def _home() -> Path:
    home = Path(os.environ.get("APA_HOME", "var"))
    return home if home.is_absolute() else REPO / home


def _require(path: Path) -> None:
    if path.exists():
        return
    reason = f"{path} is missing: run `apa assets fetch` (APA_HOME={_home()})"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_threads")
def test_real_model_trains_and_engine_matches_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    assets_dir = _home() / "assets"
    model_dir = assets_dir / "smollm2-135m-instruct"
    _require(model_dir / "config.json")
    _require(assets_dir / "movielens-100k")

    base = load_base_model(model_dir)
    assert (base.yes_id, base.no_id) == (YES_ID, NO_ID)
    marker = json.loads((model_dir / "apa-asset.json").read_text())
    assert base.sha256 == marker["safetensors_sha256"]

    dataset = movielens_100k(assets_dir)
    assert len(dataset.interactions) == 100_000
    splits = split_samples(build_samples(dataset), n_train=16, n_valid=1, n_test=3, seed=0)
    titles = dataset.titles
    train = splits["train"]
    prompts = [s.prompt(titles) for s in train]
    model, stats = train_adapter(base, prompts, [s.label for s in train],
                                 TrainConfig(max_epochs=1, patience=None, batch_size=8), seed=0)
    assert stats.steps == 2
    assert all(np.isfinite(stats.losses))
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").is_file()

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(folder))
    peft_model.eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # two steps moved B off its zero init

    queries = [s.prompt(titles) for s in splits["test"]] + prompts[:1]
    ref_hidden = forward_last_hidden(base, queries, batch_size=4, model=peft_model)
    ref_p = score_hidden(base, ref_hidden, model=peft_model).numpy()

    engine = TorchEngine(base)
    engine.load([AdapterRef(shard=0, version=1, path=folder)])
    hidden, p = engine_outputs(engine, queries, np.ones((len(queries), 1)), monkeypatch)
    head = peft_model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), head(ref_hidden), atol=1e-4, rtol=0.0)
    np.testing.assert_allclose(p, ref_p, atol=1e-4, rtol=0.0)
