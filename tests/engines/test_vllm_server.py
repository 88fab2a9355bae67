"""The vLLM engine against the real vLLM server (``scripts/vllm-serve.sh`` from ``.venv-vllm``).

Marked ``vllm``: they run when ``.venv-vllm`` exists (``scripts/setup-vllm.sh``) and skip otherwise.
vLLM serves the real SmolLM2 (``apa assets fetch``); the shard adapters are random rank-8 LoRAs on
q_proj and v_proj (B non-zero, so each one moves p(yes)). p(yes) must be within 2e-3 of the torch
engine's on the same prompts and weights, APA(ND) and APA(D), and through a quarantine and a swap.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from apa import prompts
from apa.data import movielens_100k
from apa.engines.base import AdapterRef, Mode
from apa.engines.torch import TorchEngine
from apa.engines.vllm import VllmEngine
from apa.model import BaseModel, load_base_model
from bench.engines import vllm_server

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).parents[2]
VENV = Path(os.environ.get("APA_VLLM_VENV", ROOT / ".venv-vllm"))
K, R = 4, 8
TOL = 2e-3
START_TIMEOUT_S = 600


def _assets_dir() -> Path:
    return Path(os.environ.get("APA_HOME", "var")) / "assets"


def _model_dir() -> Path:
    return _assets_dir() / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not (VENV / "bin" / "python").is_file():
        pytest.skip(f"no {VENV}: run scripts/setup-vllm.sh")
    folder = _model_dir()
    if not (folder / "config.json").is_file():
        pytest.skip(f"no base model at {folder}: run `apa assets fetch`")
    return folder


@pytest.fixture(scope="module")
def base(model_dir: Path) -> BaseModel:
    return load_base_model(model_dir)


def random_adapter(base_model: BaseModel, folder: Path, seed: int) -> Path:
    """A rank-8 PEFT LoRA (alpha 16) on q_proj and v_proj with random A and B, saved PEFT's way."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base_model.model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(folder))
    model.unload()  # the base model back, unwrapped
    return folder


@pytest.fixture(scope="module")
def shard_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vllm-shards")
    scratch = load_base_model(model_dir)
    return [random_adapter(scratch, root / f"shard-{k}", seed=500 + k) for k in range(K + 1)]


@pytest.fixture(scope="module")
def server_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A vLLM server of our own, started as a user would (scripts/vllm-serve.sh), stopped afterwards."""
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with vllm_server(model_dir, log, venv=VENV, timeout_s=START_TIMEOUT_S,
                     env={"APA_VLLM_MAX_CPU_LORAS": "4"}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def texts(model_dir: Path) -> list[str]:
    """Ten real candidate prompts of one made-up user (same history, ten target titles)."""
    titles = list(movielens_100k(_assets_dir()).titles.values())
    return [prompts.sample_prompt(titles[:6], titles[6:10], target) for target in titles[20:30]]


def refs(paths: list[Path]) -> list[AdapterRef]:
    return [AdapterRef(shard=k, version=1, path=p) for k, p in enumerate(paths)]


@pytest.fixture
def engines(base: BaseModel, server_url: str, shard_dirs: list[Path],
            tmp_path: Path) -> Iterator[tuple[VllmEngine, TorchEngine]]:
    vllm = VllmEngine(base, url=server_url, adapter_dir=tmp_path / "merged", max_adapters=4)
    torch_engine = TorchEngine(load_base_model(_model_dir()))
    vllm.load(refs(shard_dirs[:K]))
    torch_engine.load(refs(shard_dirs[:K]))
    yield vllm, torch_engine
    vllm.close()


def server_adapters(url: str) -> set[str]:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("mode", ["nd", "d"])
def test_p_yes_equals_the_torch_engine(engines: tuple[VllmEngine, TorchEngine], texts: list[str],
                                       mode: Mode) -> None:
    vllm, torch_engine = engines
    p = vllm.score_shared(texts, WEIGHTS, mode=mode)
    expected = torch_engine.score_shared(texts, WEIGHTS, mode=mode)
    print(f"{mode}: max |p_vllm - p_torch| = {np.abs(p - expected).max():.2e}")
    np.testing.assert_allclose(p, expected, atol=TOL, rtol=0.0)
    base_p = torch_engine.score_shared(texts, np.eye(K)[0], mode=mode)  # another mixture is visibly elsewhere
    assert np.abs(base_p - expected).max() > 5 * TOL
    rows = np.array([WEIGHTS, WEIGHTS[::-1]] * 2)  # two distinct rows: two adapters, two requests
    np.testing.assert_allclose(vllm.score(texts[:4], rows, mode=mode), torch_engine.score(texts[:4], rows, mode=mode),
                               atol=TOL, rtol=0.0)


def test_quarantine_and_swap_on_the_vllm_path(engines: tuple[VllmEngine, TorchEngine], server_url: str,
                                              shard_dirs: list[Path], texts: list[str]) -> None:
    vllm, torch_engine = engines
    vllm.score_shared(texts, WEIGHTS)
    with_shard = set(vllm.loaded_adapters())
    assert with_shard and with_shard <= server_adapters(server_url)

    vllm.quarantine(1)  # a deletion hit shard 1
    torch_engine.quarantine(1)
    assert not with_shard & server_adapters(server_url)  # unloaded from the server at once
    p = vllm.score_shared(texts, WEIGHTS)
    np.testing.assert_allclose(p, torch_engine.score_shared(texts, WEIGHTS), atol=TOL, rtol=0.0)
    quarantined = set(vllm.loaded_adapters())
    assert not quarantined & with_shard

    retrained = AdapterRef(shard=1, version=2, path=shard_dirs[K])  # the retrained version goes live
    vllm.load_shards([retrained])
    torch_engine.load_shards([retrained])
    vllm.release(1)
    torch_engine.release(1)
    p = vllm.score_shared(texts, WEIGHTS)
    np.testing.assert_allclose(p, torch_engine.score_shared(texts, WEIGHTS), atol=TOL, rtol=0.0)
    served = vllm.loaded_adapters()
    assert not set(served) & with_shard  # adapters holding shard 1 v1 never come back
    assert served[-1] not in with_shard | quarantined  # the one just used holds shard 1 v2
    assert set(served) <= server_adapters(server_url)
    assert [(s.shard, s.version, s.active) for s in vllm.live()][1] == (1, 2, True)


# -- the gateway on the real vLLM server: a deletion end to end ------------------------------------------------

@pytest.fixture(scope="module")
def real_run_home(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' K=2, rank-4 run on the hand-made dataset, trained with the real SmolLM2 (seconds)."""
    from tests.conftest import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("real-run"), load_base_model(model_dir))


def test_a_deletion_end_to_end_through_the_gateway(real_run_home: Path, model_dir: Path, server_url: str,
                                                   redis_prefix: str, tmp_path: Path) -> None:
    """APA_ENGINE=vllm: the gateway scores through the real server; a DELETE takes every adapter holding
    the user's shard off the server before it returns, and the retrained version is served after the swap."""
    import shutil

    from tests.conftest import gateway_with_worker, service_settings
    from tests.service.test_flow import AUTH, run_worker, user_with_train_samples, wait_for

    home = tmp_path / "home"
    shutil.copytree(real_run_home, home)
    settings = service_settings(home, f"sqlite:///{tmp_path / 'apa.db'}", redis_prefix, model_dir,
                                engine="vllm", vllm_url=server_url, vllm_max_adapters=4)
    with gateway_with_worker(settings, model_dir) as env:
        client, run_dir = env["client"], env["run_dir"]
        user, _ = user_with_train_samples(run_dir)
        other = next(u for u in ("u1", "u2", "u3", "u4") if u != user)
        ask = {"user_id": other, "candidates": ["1", "2", "3"]}
        before = client.post("/recommend", json=ask)
        assert before.status_code == 200, before.text
        assert before.json()["fallback"] is False
        assert {(a["shard"], a["version"]) for a in before.json()["adapters"]} == {(0, 1), (1, 1)}
        mixed = server_adapters(server_url)
        assert mixed  # the mixture was loaded on the server and scored there

        deleted = client.delete(f"/users/{user}/interactions", headers=AUTH)
        assert deleted.status_code == 202, deleted.text
        shards = set(deleted.json()["affected_shards"])  # trained on the user, or chose its epoch on them
        assert not mixed & server_adapters(server_url)  # every adapter holding the shard left the server

        during = client.post("/recommend", json=ask).json()
        assert not mixed & server_adapters(server_url)  # and none came back
        if shards == {0, 1}:  # no clean shard left: popularity, no adapter at all
            assert during["fallback"] is True
        else:
            assert not shards & {a["shard"] for a in during["adapters"]} and during["fallback"] is False

        run_worker(env)  # retrains the user's shards without the deleted samples
        assert client.get(f"/deletions/{deleted.json()['request_id']}").json()["status"] == "completed"

        def swapped() -> bool:
            adapters = client.post("/recommend", json=ask).json()["adapters"]
            return {(a["shard"], a["version"]) for a in adapters} >= {(k, 2) for k in shards}

        wait_for(swapped, timeout_s=120)
        after = client.post("/recommend", json=ask).json()
        assert after["fallback"] is False and {a["shard"] for a in after["adapters"]} == {0, 1}
        serving = server_adapters(server_url)
        assert serving and not serving & mixed  # the retrained mixture: new names, never an old one
    assert not serving & server_adapters(server_url)  # a stopped gateway gives the server's slots back
