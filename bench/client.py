"""A small typed client of the serving contract (the demo and the time-to-forget benchmark use it)."""

import time
from dataclasses import dataclass, field
from typing import Any

import httpx


class APIError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.request.method} {response.request.url.path} -> {response.status_code}: "
                         f"{response.text[:500]}")
        self.status_code = response.status_code


@dataclass
class Forget:
    """Timings of one deletion, from just before DELETE was sent."""

    request_id: str
    affected_shards: list[int]
    first_status: str
    seconds_to_quarantine: float | None  # first one-candidate /recommend without the affected shards
    seconds_to_completed: float | None = None
    deletion: dict[str, Any] = field(default_factory=dict)


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response, *ok: int) -> Any:
        if response.status_code not in (ok or (200,)):
            raise APIError(response)
        return response.json()

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.http.base_url} not ready after {timeout_s:.0f} s")
            time.sleep(0.5)

    def recommend(self, user_id: str, candidates: list[str] | None = None, top_k: int = 10) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": user_id, "top_k": top_k}
        if candidates is not None:
            body["candidates"] = candidates
        return dict(self._json(self.http.post("/recommend", json=body)))

    def delete_user(self, user_id: str, item_ids: list[str] | None = None,
                    idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = httpx.QueryParams([("item_id", i) for i in item_ids or []])
        return dict(self._json(self.http.delete(f"/users/{user_id}/interactions", params=params,
                                                headers=headers), 202))

    def ingest(self, user_id: str, interactions: list[dict[str, Any]],
               idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._json(self.http.post(f"/users/{user_id}/interactions", json={"interactions": interactions},
                                              headers=headers), 202))

    def retrain(self, shard: int) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/admin/shards/{shard}/retrain"), 202))

    def deletion(self, request_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/deletions/{request_id}")))

    def status(self) -> dict[str, Any]:
        return dict(self._json(self.http.get("/admin/status")))

    def forget(self, user_id: str, probe_user: str, probe_item: str, *, timeout_s: float = 3600.0,
               poll_s: float = 0.5, max_probes: int = 50) -> Forget:
        """DELETE a user's interactions; time the quarantine (probe /recommend) and the completion."""
        started = time.perf_counter()
        accepted = self.delete_user(user_id)
        affected = set(accepted["affected_shards"])
        to_quarantine = None
        for _ in range(max_probes):
            answer = self.recommend(probe_user, [probe_item], top_k=1)
            if not affected & {a["shard"] for a in answer["adapters"]}:
                to_quarantine = time.perf_counter() - started
                break
        result = Forget(request_id=accepted["request_id"], affected_shards=sorted(affected),
                        first_status=accepted["status"], seconds_to_quarantine=to_quarantine)
        deadline = time.monotonic() + timeout_s
        while True:
            result.deletion = self.deletion(result.request_id)
            if result.deletion["status"] in ("completed", "failed"):
                break
            if time.monotonic() > deadline:
                return result
            time.sleep(poll_s)
        if result.deletion["status"] == "completed":
            result.seconds_to_completed = time.perf_counter() - started
        return result
