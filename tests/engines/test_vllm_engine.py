"""The vLLM engine's logic against a stand-in server: PEFT itself behind vLLM's HTTP endpoints.

The stand-in loads each merged adapter folder with PEFT on the tiny Llama and answers
``/v1/completions`` the way vLLM does with ``--logprobs-mode processed_logprobs`` and
``allowed_token_ids=[Yes, No]``: the two log-probabilities renormalised over the pair. So these tests
check the engine (merging, naming, the adapter registry, quarantine, the request) against the torch
engine in milliseconds; tests/engines/test_vllm_server.py does the same against the real vLLM server.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from apa.engines import ENGINES
from apa.engines.base import AdapterRef, Mode, effective_weights
from apa.engines.merge import adapter_name
from apa.engines.torch import TorchEngine
from apa.engines.vllm import VllmEngine
from apa.errors import AdapterMismatch, EngineUnavailable
from apa.model import BaseModel
from tests.conftest import TINY_RUN, load_tiny
from tests.support.adapters import K, R, make_adapter, refs

TOL = 1e-4


class StandInServer:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.adapters: dict[str, str] = {}  # name -> folder, as loaded now
        self.models: dict[str, Any] = {}
        self.events: list[tuple[str, str]] = []  # (load|unload|score, name)
        self.answer_only: int | None = None  # to simulate a server that drops one of the two tokens

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.adapters:
                message = f"The lora adapter '{name}' has already been loaded."
                return httpx.Response(400, json={"error": {"message": message}})
            assert Path(body["lora_path"], "adapter_config.json").is_file()
            self.adapters[name] = body["lora_path"]
            self.events.append(("load", name))
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            if self.adapters.pop(name, None) is None:
                return httpx.Response(404, json={"error": {"message": "not found"}})
            self.models.pop(name, None)
            self.events.append(("unload", name))
            return httpx.Response(200, text="Success")
        if path == "/v1/completions":
            return httpx.Response(200, json=self.complete(body))
        if path == "/reset_prefix_cache":
            return httpx.Response(200, text="")
        return httpx.Response(404, json={"error": {"message": path}})

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        from peft import PeftModel

        name = body["model"]
        assert name in self.adapters, f"request for adapter {name} that is not loaded"
        assert body["max_tokens"] == 1 and body["return_tokens_as_token_ids"]
        self.events.append(("score", name))
        if name not in self.models:
            self.models[name] = PeftModel.from_pretrained(load_tiny(self.model_dir).model, self.adapters[name]).eval()
        model, allowed = self.models[name], body["allowed_token_ids"]
        choices = []
        for i, ids in enumerate(body["prompt"]):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1, allowed]  # [2]
            logprobs = torch.log_softmax(logits.double(), dim=-1).tolist()
            top = {f"token_id:{t}": lp for t, lp in zip(allowed, logprobs, strict=True)
                   if self.answer_only is None or t == self.answer_only}
            choices.append({"index": i, "text": "", "logprobs": {"top_logprobs": [top]}})
        return {"choices": choices[::-1]}  # any order: the engine sorts by index


@pytest.fixture(scope="session")
def shard_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return [make_adapter(tiny_model_dir, root / f"s{k}", seed=400 + k) for k in range(K + 1)]


@pytest.fixture
def server(tiny_model_dir: Path) -> StandInServer:
    return StandInServer(tiny_model_dir)


def vllm_engine(base: BaseModel, server: StandInServer, tmp_path: Path, **options: Any) -> VllmEngine:
    client = httpx.Client(transport=httpx.MockTransport(server.handle), base_url="http://vllm")
    return VllmEngine(base, url="http://vllm", adapter_dir=tmp_path / "merged", client=client, **options)


@pytest.fixture
def engines(tiny_model_dir: Path, server: StandInServer, shard_dirs: list[Path],
            tmp_path: Path) -> tuple[VllmEngine, TorchEngine]:
    vllm = vllm_engine(load_tiny(tiny_model_dir), server, tmp_path)
    torch_engine = TorchEngine(load_tiny(tiny_model_dir))
    vllm.load(refs(shard_dirs[:K]))
    torch_engine.load(refs(shard_dirs[:K]))
    return vllm, torch_engine


@pytest.fixture
def texts(dataset) -> list[str]:  # type: ignore[no-untyped-def]
    from apa.samples import build_samples

    return [s.prompt(dataset.titles) for s in build_samples(dataset)][:6]


ROWS = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.7, 0.0, 0.3], [0.6, 0.3, 0.1],
                 [0.2, 0.2, 0.6]])  # three distinct rows; one without shard 1


def name_of(engine: VllmEngine, row: np.ndarray, mode: Mode = "nd") -> str:
    live = engine._adapters.view
    assert live.shards is not None
    return adapter_name(live.shards, effective_weights(row[None, :], live.active)[0], mode)


@pytest.mark.parametrize("mode", ["nd", "d"])
def test_scores_equal_the_torch_engine(engines: tuple[VllmEngine, TorchEngine], server: StandInServer,
                                       texts: list[str], mode: Mode) -> None:
    vllm, torch_engine = engines
    p = vllm.score(texts, ROWS, mode=mode)
    np.testing.assert_allclose(p, torch_engine.score(texts, ROWS, mode=mode), atol=TOL, rtol=0.0)
    assert [e for e, _ in server.events].count("score") == 3  # one request per distinct weight row
    shared = vllm.score_shared(texts, ROWS[2], mode=mode)
    np.testing.assert_allclose(shared, torch_engine.score_shared(texts, ROWS[2], mode=mode), atol=TOL, rtol=0.0)
    assert [e for e, _ in server.events].count("load") == 3  # the row seen before reuses its adapter
    assert vllm.score_shared([], ROWS[0]).shape == (0,)


def test_quarantine_unloads_every_adapter_with_the_shard_and_never_uses_one_again(
    engines: tuple[VllmEngine, TorchEngine], server: StandInServer, texts: list[str], tmp_path: Path,
) -> None:
    vllm, torch_engine = engines
    vllm.score(texts, ROWS)
    before = set(vllm.loaded_adapters())
    assert len(before) == 3 and set(server.adapters) == before

    vllm.quarantine(1)
    torch_engine.quarantine(1)
    kept = set(vllm.loaded_adapters())
    assert kept == set(server.adapters)  # the server holds only what the engine may still pick
    assert kept == {name_of(vllm, ROWS[3])}  # the only one without shard 1
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(kept)  # the others' files are gone

    scored_from = len(server.events)
    p = vllm.score(texts, ROWS)
    np.testing.assert_allclose(p, torch_engine.score(texts, ROWS), atol=TOL, rtol=0.0)
    used = {name for event, name in server.events[scored_from:] if event == "score"}
    assert not used & (before - kept)
    assert name_of(vllm, ROWS[0]) in used  # [0.6, 0, 0.1] renormalised
    for name in used:  # rank 2r: two shards; the quarantined one is not in the file at all
        config = json.loads((tmp_path / "merged" / name / "adapter_config.json").read_text())
        assert config["r"] == 2 * R

    vllm.release(1)
    torch_engine.release(1)
    np.testing.assert_allclose(vllm.score(texts, ROWS), torch_engine.score(texts, ROWS), atol=TOL, rtol=0.0)


def test_a_swapped_version_retires_its_adapters(
    engines: tuple[VllmEngine, TorchEngine], server: StandInServer, shard_dirs: list[Path], texts: list[str],
) -> None:
    vllm, torch_engine = engines
    vllm.score(texts, ROWS)
    old = set(vllm.loaded_adapters())
    new = AdapterRef(shard=0, version=2, path=shard_dirs[K])
    vllm.load_shards([new])
    torch_engine.load_shards([new])
    assert [(s.shard, s.version, s.active) for s in vllm.live()] == [(0, 2, True), (1, 1, True), (2, 1, True)]
    assert vllm.loaded_adapters() == [] and server.adapters == {}  # every row used shard 0's old version
    p = vllm.score(texts, ROWS)
    np.testing.assert_allclose(p, torch_engine.score(texts, ROWS), atol=TOL, rtol=0.0)
    assert len(vllm.loaded_adapters()) == 3 and not set(vllm.loaded_adapters()) & old


def test_least_recently_used_adapters_are_unloaded(
    tiny_model_dir: Path, server: StandInServer, shard_dirs: list[Path], texts: list[str], tmp_path: Path,
) -> None:
    vllm = vllm_engine(load_tiny(tiny_model_dir), server, tmp_path, max_adapters=2)
    vllm.load(refs(shard_dirs[:K]))
    for row in ([0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]):
        vllm.score_shared(texts[:2], np.array(row))
    names = [name for event, name in server.events if event == "load"]
    assert len(names) == 3 and len(set(names)) == 3
    assert set(vllm.loaded_adapters()) == set(server.adapters) == {names[0], names[2]}  # [0, .5, .5] went
    assert ("unload", names[1]) in server.events
    assert not (tmp_path / "merged" / names[1]).exists()
    vllm.close()
    assert server.adapters == {}


def test_weight_step_bounds_the_adapters(
    tiny_model_dir: Path, server: StandInServer, shard_dirs: list[Path], texts: list[str], tmp_path: Path,
) -> None:
    vllm = vllm_engine(load_tiny(tiny_model_dir), server, tmp_path, weight_step=0.1)
    vllm.load(refs(shard_dirs[:K]))
    torch_engine = TorchEngine(load_tiny(tiny_model_dir))
    torch_engine.load(refs(shard_dirs[:K]))
    p = [vllm.score_shared(texts, np.array(row)) for row in ([0.61, 0.29, 0.10], [0.58, 0.32, 0.10])]
    assert [e for e, _ in server.events].count("load") == 1  # both snap to [0.6, 0.3, 0.1]
    np.testing.assert_allclose(p[0], p[1], atol=0.0)
    np.testing.assert_allclose(p[0], torch_engine.score_shared(texts, np.array([0.6, 0.3, 0.1])), atol=TOL, rtol=0.0)


def test_errors(engines: tuple[VllmEngine, TorchEngine], server: StandInServer, texts: list[str],
                tiny_model_dir: Path, shard_dirs: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vllm, _ = engines
    with pytest.raises(AdapterMismatch):
        vllm.score(texts, ROWS[:, :2])
    server.answer_only = vllm.base.yes_id
    with pytest.raises(EngineUnavailable, match="both Yes and No"):
        vllm.score_shared(texts, ROWS[0])
    empty = vllm_engine(load_tiny(tiny_model_dir), server, tmp_path / "other")
    with pytest.raises(AdapterMismatch):
        empty.score_shared(texts, ROWS[0])

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = VllmEngine(vllm.base, url="http://vllm", adapter_dir=tmp_path / "down",
                      client=httpx.Client(transport=httpx.MockTransport(refuse), base_url="http://vllm"))
    with caplog.at_level("WARNING", logger="apa.engines.vllm"):
        down.drop_cached()  # best effort: a deletion does not fail on it
    assert "could not clear" in caplog.text
    down.load(refs(shard_dirs[:K]))
    with pytest.raises(EngineUnavailable):  # scoring does fail: 503 at the gateway
        down.score_shared(texts, ROWS[0])


def test_registry_builds_both_engines(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_model_dir)
    assert isinstance(ENGINES["torch"](base), TorchEngine)
    assert isinstance(ENGINES["vllm"](base, url="http://127.0.0.1:1", adapter_dir=tmp_path), VllmEngine)


# -- the gateway on the vLLM engine: a deletion end to end (the stand-in server behind it) ----------

@pytest.fixture
def vllm_gateway(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path,
                 server: StandInServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:

    from tests.conftest import gateway_with_worker, service_settings

    def standin(base: BaseModel, **options: Any) -> VllmEngine:
        client = httpx.Client(transport=httpx.MockTransport(server.handle), base_url=options["url"])
        return VllmEngine(base, client=client, **options)

    monkeypatch.setitem(ENGINES, "vllm", standin)
    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, engine="vllm")
    with gateway_with_worker(settings, tiny_model_dir) as env:
        yield env


def test_a_deletion_end_to_end_on_the_vllm_engine(vllm_gateway: dict, server: StandInServer) -> None:
    from tests.service.test_flow import AUTH, run_worker, user_with_train_samples, wait_for

    client, run_dir, settings = vllm_gateway["client"], vllm_gateway["run_dir"], vllm_gateway["settings"]
    adapter_dir = settings.home / "vllm-adapters"
    r = TINY_RUN.train.r
    user, _ = user_with_train_samples(run_dir)
    other = next(u for u in ("u1", "u2", "u3", "u4") if u != user)
    before = client.post("/recommend", json={"user_id": other, "candidates": ["1", "2"]})
    assert before.status_code == 200, before.text
    assert {a["shard"] for a in before.json()["adapters"]} == {0, 1} and before.json()["fallback"] is False
    mixed = {name for event, name in server.events if event == "score"}
    assert mixed and set(server.adapters) == mixed

    deleted = client.delete(f"/users/{user}/interactions", headers=AUTH)
    assert deleted.status_code == 202, deleted.text
    shards = set(deleted.json()["affected_shards"])  # trained on the user, or chose its epoch on them
    assert not mixed & set(server.adapters)  # the mixtures holding the shard left the server at once
    assert not any((adapter_dir / name).exists() for name in mixed)  # and the disk
    seen = len(server.events)
    during = client.post("/recommend", json={"user_id": other, "candidates": ["1", "2"]}).json()
    if shards == {0, 1}:  # the hand-made users all reach both shards: popularity, no adapter at all
        assert during["fallback"] is True
        assert not [event for event, _ in server.events[seen:] if event in ("load", "score")]
    else:
        assert not shards & {a["shard"] for a in during["adapters"]}
        used = {name for event, name in server.events[seen:] if event == "score"}
        assert used and not used & mixed
        for name in used:  # one clean shard in the file: rank r
            assert json.loads((adapter_dir / name / "adapter_config.json").read_text())["r"] == r

    run_worker(vllm_gateway)
    assert client.get(f"/deletions/{deleted.json()['request_id']}").json()["status"] == "completed"

    def swapped() -> bool:
        adapters = client.post("/recommend", json={"user_id": other, "candidates": ["1", "2"]}).json()["adapters"]
        return {(a["shard"], a["version"]) for a in adapters} >= {(k, 2) for k in shards}

    wait_for(swapped)
    last = next(name for event, name in reversed(server.events) if event == "score")
    assert last not in mixed  # the retrained versions: a new adapter, never an old name
    assert json.loads((adapter_dir / last / "adapter_config.json").read_text())["r"] == 2 * r  # both shards again
