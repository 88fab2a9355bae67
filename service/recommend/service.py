"""The recommend use case: the user's live history → per-user shard weights → one mixed forward per batch.

Ledger reads run in a worker thread; the history embedding and the candidates' scores go through
micro-batchers onto the single model thread, so concurrent requests share forwards.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from apa import prompts
from apa.embeddings import embed
from apa.errors import AllShardsQuarantined
from apa.samples import recent_history
from ledger import catalog
from service.batching import MicroBatcher
from service.deadline import LoadShed
from service.errors import ItemsNotFound
from service.limits import Admission
from service.metrics import Metrics
from service.recommend.schemas import AdapterWeight, ItemScore, RecommendRequest, RecommendResponse
from service.replica import Replica
from service.settings import ServiceSettings

ALL_ITEMS = 10**9  # the ranking's limit: every item with a live interaction


@dataclass(frozen=True)
class Query:
    user_id: str
    history_prompt: str
    candidates: list[str]
    titles: dict[str, str]
    prompts: list[str]
    popularity: dict[str, int]
    top_k: int


class Recommender:
    def __init__(self, settings: ServiceSettings, replica: Replica, sessions: sessionmaker[Session],
                 metrics: Metrics) -> None:
        self.settings, self.replica, self.sessions, self.metrics = settings, replica, sessions, metrics
        self._ranking: tuple[int, list[str]] | None = None  # (history cache epoch, every item by popularity)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.admission = Admission(settings.max_model_waiting)
        window = settings.batch_window_ms / 1000
        self.embedder: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self._embed, executor=self.executor, window_s=window, max_items=settings.max_batch_prompts)
        self.scorer: MicroBatcher[tuple[str, str, np.ndarray], float] = MicroBatcher(
            self._score, executor=self.executor, window_s=window, max_items=settings.max_batch_prompts)

    def start(self) -> None:
        self.embedder.start()
        self.scorer.start()

    async def stop(self) -> None:
        await self.embedder.stop()
        await self.scorer.stop()
        self.executor.shutdown(wait=True)

    # -- on the model thread ------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> list[np.ndarray]:
        self.metrics.batches.labels(kind="embed").inc()
        started = time.perf_counter()
        out = list(embed(self.replica.base, texts, batch_size=self.settings.score_batch_size,
                         noun=self.replica.run.config.noun))
        self.replica.deadline.pause_after(time.perf_counter() - started)  # yields to an owed retrain
        return out

    def _score(self, items: list[tuple[str, str, np.ndarray]]) -> list[float]:
        """(user, prompt, weights [K]) -> p(yes). With prefix sharing, each user's prompts are scored
        together on their common prefix; otherwise every prompt is one full forward."""
        self.metrics.batches.labels(kind="score").inc()
        started = time.perf_counter()
        try:
            return self._score_items(items)
        finally:
            self.replica.deadline.pause_after(time.perf_counter() - started)  # yields to an owed retrain

    def _score_items(self, items: list[tuple[str, str, np.ndarray]]) -> list[float]:
        engine, mode, batch_size = self.replica.engine, self.settings.mode, self.settings.score_batch_size
        if not self.settings.prefix_sharing:
            weights = np.stack([w for _, _, w in items])  # [n, K]
            p = engine.score([text for _, text, _ in items], weights, mode=mode, batch_size=batch_size)
            return [float(x) for x in p]
        groups: dict[tuple[str, bytes], list[int]] = {}
        for i, (user, _, w) in enumerate(items):
            groups.setdefault((user, w.tobytes()), []).append(i)
        out = [0.0] * len(items)
        for index in groups.values():
            p = engine.score_shared([items[i][1] for i in index], items[index[0]][2], mode=mode,
                                    batch_size=self.settings.packed_prompts)
            for i, x in zip(index, p, strict=True):
                out[i] = float(x)
        return out

    # -- per request ----------------------------------------------------------------------------
    def popular(self, session: Session, exclude: set[str], epoch: int) -> list[str]:
        """The most popular items not in ``exclude``: the ledger's ranking of every item, read again only
        after this replica saw a deletion (``epoch``: the history cache's, read before the request)."""
        ranking = self._ranking
        if ranking is None or ranking[0] != epoch:
            ranking = (epoch, catalog.popular_items(session=session, exclude=set(), limit=ALL_ITEMS))
            self._ranking = ranking
        return [item for item in ranking[1] if item not in exclude][:self.settings.popular_candidates]

    def prepare(self, request: RecommendRequest, epoch: int) -> Query:
        cfg = self.replica.run.config
        with self.sessions() as session:
            history = catalog.live_history(session=session, user_id=request.user_id)
            if request.candidates is None:
                candidates = self.popular(session, {item for item, _ in history}, epoch)
            else:
                candidates = list(dict.fromkeys(request.candidates))
            titles = catalog.titles(session=session, item_ids=sorted({*candidates, *(i for i, _ in history)}))
            unknown = [c for c in candidates if c not in titles]
            if unknown:
                raise ItemsNotFound(unknown)
            popularity = catalog.popularity(session=session, item_ids=candidates)
        liked, disliked = recent_history(history, titles, max_history=cfg.max_history,
                                         like_threshold=cfg.like_threshold)
        return Query(
            user_id=request.user_id, history_prompt=prompts.history_prompt(liked, disliked, noun=cfg.noun),
            candidates=candidates, titles=titles, popularity=popularity, top_k=request.top_k,
            prompts=[prompts.sample_prompt(liked, disliked, titles[c], noun=cfg.noun) for c in candidates],
        )

    async def history_embedding(self, query: Query, epoch: int) -> np.ndarray:
        cache = self.replica.histories
        embedding = cache.get(query.user_id, query.history_prompt)
        self.metrics.history_cache.labels(result="miss" if embedding is None else "hit").inc()
        if embedding is None:
            [embedding] = await self.embedder.submit([query.history_prompt])
            cache.put(query.user_id, query.history_prompt, embedding, epoch)
        return embedding

    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        deadline = self.replica.deadline
        if deadline.stance() == "shed":
            self.metrics.shed.inc()
            raise LoadShed(self.settings.shed_retry_after_s, deadline.waited_s() or 0.0)
        epoch = self.replica.histories.epoch  # before the history is read
        query = await run_in_threadpool(self.prepare, request, epoch)
        active = self.replica.active()
        if active and query.candidates:
            with self.admission:  # a full model queue answers 503 at once
                history_embedding = await self.history_embedding(query, epoch)
                weights = self.replica.attention.weights(history_embedding, active)  # [K]
                try:
                    scores = await self.scorer.submit([(query.user_id, p, weights) for p in query.prompts])
                except AllShardsQuarantined:
                    active = {}
                else:
                    adapters = [AdapterWeight(shard=s, version=v, weight=round(float(weights[s]), 6))
                                for s, v in sorted(active.items()) if weights[s] > 0]
                    return self._answer(query, scores, adapters, fallback=False)
        top = max(query.popularity.values(), default=0) or 1
        return self._answer(query, [query.popularity.get(c, 0) / top for c in query.candidates], [], fallback=True)

    def _answer(self, query: Query, scores: list[float], adapters: list[AdapterWeight], *,
                fallback: bool) -> RecommendResponse:
        self.metrics.predictions.labels(fallback=str(fallback).lower()).inc(len(scores))
        ranked = sorted(zip(query.candidates, scores, strict=True), key=lambda cs: (-cs[1], cs[0]))
        return RecommendResponse(
            user_id=query.user_id, adapters=adapters, fallback=fallback,
            items=[ItemScore(item_id=c, title=query.titles[c], score=float(np.clip(s, 0.0, 1.0)))
                   for c, s in ranked[:query.top_k]],
        )
