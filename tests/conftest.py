"""Shared fixtures: a tiny random Llama with a tiny offline tokenizer, and a hand-made dataset.

The tiny model has the real model's architecture (Llama: q/k/v/o projections, GQA, RMSNorm) at
toy sizes, so every code path runs in milliseconds. Its tokenizer is a word-level vocabulary built
from the prompt template and the dataset's titles, so ``### Response:\\nYes`` ends in one token.
"""

import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from redis import Redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import apa.engines.torch as torch_engine
from apa import prompts
from apa.data import Dataset, normalise, save
from apa.engines.base import Mode
from apa.engines.torch import TorchEngine
from apa.model import BaseModel, load_base_model
from apa.runs import RunConfig, train_run
from apa.settings import CoreSettings
from apa.training import TrainConfig
from ledger.db import dispose_engines

torch.set_num_threads(1)

SEED = 1234

# (item_id, title): every title word is in the tiny tokenizer's vocabulary.
TITLES = {
    "1": "Toy Story (1995)",
    "2": "GoldenEye (1995)",
    "3": "Four Rooms (1995)",
    "4": "Get Shorty (1995)",
    "5": "Copycat (1995)",
    "6": "Twelve Monkeys (1995)",
    "7": "Babe (1995)",
    "8": "Dead Man Walking (1995)",
    "9": "Richard III (1995)",
    "10": "Seven (Se7en) (1995)",
    "11": "Usual Suspects, The (1995)",
    "12": "Mighty Aphrodite (1995)",
}

# user -> [(item_id, rating, timestamp)], deliberately not in time order; u1 has a timestamp tie
# (items "10" and "2" at t=300: ordered by item_id as strings, so "10" before "2").
RATINGS = {
    "u1": [("3", 2, 400), ("1", 5, 100), ("2", 4, 300), ("10", 1, 300), ("4", 3, 200), ("5", 5, 500)],
    "u2": [("6", 4, 110), ("7", 1, 120), ("8", 5, 130), ("9", 2, 140), ("11", 5, 150), ("12", 3, 160),
           ("1", 4, 170), ("2", 1, 180)],
    "u3": [("4", 5, 210), ("5", 2, 220), ("6", 4, 230), ("7", 5, 240), ("8", 1, 250), ("9", 4, 260),
           ("10", 3, 270), ("11", 4, 280)],
    "u4": [("12", 1, 310), ("1", 5, 320), ("3", 4, 330), ("5", 1, 340), ("7", 4, 350), ("9", 5, 360),
           ("11", 2, 370), ("2", 5, 380)],
}


def raw_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The hand-made dataset as a user would hand it over (integers where MovieLens has them)."""
    interactions = pd.DataFrame(
        [(user, item, rating, ts) for user, rows in RATINGS.items() for item, rating, ts in rows],
        columns=["user_id", "item_id", "rating", "timestamp"],
    )
    items = pd.DataFrame(list(TITLES.items()), columns=["item_id", "title"])
    return interactions, items


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture
def dataset() -> Dataset:
    interactions, items = raw_frames()
    return normalise(interactions, items, source="handmade")


def _tokenizer_corpus() -> list[str]:
    titles = list(TITLES.values())
    return [
        *(prompts.sample_prompt(titles, titles, title) for title in titles),
        prompts.history_prompt(titles, titles),
        f"{prompts.YES} {prompts.NO}",
    ]


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the prompt template, the titles and Yes/No (no downloads)."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_tokenizer_corpus(), trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def build_tiny_model(folder: Path, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> None:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so adapters and prompts move p(yes) visibly
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    build_tiny_model(folder, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                     tokenizer.eos_token_id)
    return folder


def load_tiny(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(tiny_model_dir)


@pytest.fixture
def tiny_base(tiny_model_dir: Path) -> BaseModel:
    """A fresh load per test: engines wrap the model's layers in place."""
    return load_tiny(tiny_model_dir)


def engine_outputs(
    engine: TorchEngine, texts: list[str], weights: np.ndarray, monkeypatch: pytest.MonkeyPatch,
    mode: Mode = "nd", batch_size: int = 4,
) -> tuple[torch.Tensor, np.ndarray]:
    """The engine's p(yes) and the last hidden states it read them from (captured on the way)."""
    captured: list[torch.Tensor] = []
    real: Callable[..., torch.Tensor] = torch_engine.score_hidden

    def capture(base: BaseModel, hidden: torch.Tensor, model: object = None) -> torch.Tensor:
        captured.append(hidden.clone())
        return real(base, hidden, model)

    with monkeypatch.context() as patch:
        patch.setattr(torch_engine, "score_hidden", capture)
        p = engine.score(texts, weights, mode=mode, batch_size=batch_size)
    assert len(captured) == 1
    return captured[0], p


# -- service fixtures: a tiny trained run, a migrated ledger (SQLite or PostgreSQL), a Redis prefix --------
POSTGRES_URL = os.environ.get("APA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("APA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ADMIN_TOKEN = "test-admin-token"
TINY_RUN = RunConfig(
    dataset="handmade", shards=2, partition="semantic", n_train=8, n_valid=8, n_test=8, seed=0, min_history=1,
    batch_size=4, train=TrainConfig(r=4, max_epochs=1, batch_size=4),
)  # seed 0 puts both labels in valid and test (AUC needs them); the hand-made users have 6-8 ratings


@pytest.fixture
def tiny_home(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An APA_HOME with the hand-made dataset and the tiny model as the base model, set in the environment
    so that `apa` processes a test starts (train, eval, verify) use them."""
    home = tmp_path / "home"
    interactions, items = raw_frames()
    save(normalise(interactions, items, source="handmade"), home / "datasets", "handmade")
    monkeypatch.setenv("APA_HOME", str(home))
    monkeypatch.setenv("APA_BASE_MODEL_PATH", str(tiny_model_dir))
    monkeypatch.delenv("APA_FAULT_POINT", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_run_template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K=2 run of the tiny model on the hand-made dataset, trained once per session (copy before use)."""
    return train_tiny_run(tmp_path_factory.mktemp("template-home"), load_tiny(tiny_model_dir))


def train_tiny_run(home: Path, base: BaseModel) -> Path:
    """``TINY_RUN`` on the hand-made dataset, trained with ``base`` into ``home``/runs/tiny; returns ``home``."""
    interactions, items = raw_frames()
    save(normalise(interactions, items, source="handmade"), home / "datasets", "handmade")
    train_run(TINY_RUN, home / "runs" / "tiny", base, datasets_dir=home / "datasets", assets_dir=home / "assets")
    return home


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema in the machine's PostgreSQL (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'apa.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable ({exc}); .ci/run starts it")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    yield url
    dispose_engines()
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in Redis; every key under it is deleted afterwards."""
    prefix = f"apa-test-{uuid.uuid4().hex[:8]}:"
    client = Redis.from_url(REDIS_URL)
    client.ping()
    yield prefix
    keys = list(client.scan_iter(f"*{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def service_home(tiny_run_template: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run's home (deletions purge files in it)."""
    home = tmp_path / "home"
    shutil.copytree(tiny_run_template, home)
    return home


def service_settings(home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path, **extra: object):
    from service.settings import ServiceSettings

    return ServiceSettings(home=home, database_url=ledger_url, base_model_path=tiny_model_dir,
                           admin_token=ADMIN_TOKEN, redis_url=REDIS_URL, redis_prefix=redis_prefix,
                           hmac_key="test-hmac-key", poll_interval_s=0.2, **extra)


@contextmanager
def gateway_with_worker(settings: Any, tiny_model_dir: Path) -> Iterator[dict]:
    """The run recorded, the app in a TestClient, and the worker's context set (tests run its jobs
    themselves): yields the client, the settings, a Redis connection and the run folder."""
    from fastapi.testclient import TestClient

    from jobs import queue
    from service.app import create_app
    from worker.settings import WorkerSettings
    from worker.tasks import WorkerContext, set_context

    record_run(settings)
    worker_settings = WorkerSettings(**settings.model_dump(include=set(WorkerSettings.model_fields)))
    redis = queue.connect(settings.redis_url)
    set_context(WorkerContext(settings=worker_settings, base=load_tiny(tiny_model_dir), redis=redis))
    try:
        with TestClient(create_app(settings)) as client:
            yield {"client": client, "settings": settings, "redis": redis, "run_dir": settings.runs_dir / "tiny"}
    finally:
        set_context(None)
        redis.close()


def record_run(settings: CoreSettings) -> None:
    from ledger import db
    from worker.record import import_run

    db.upgrade(settings.ledger_url)
    with db.session_scope(settings.ledger_url) as session:
        import_run(session, settings.runs_dir / "tiny", settings)
