"""Per-user cache of history embeddings, so a repeat ``/recommend`` costs one forward (the scores), not two.

The history embedding comes from the base model alone, so it depends only on the history prompt: an
entry is used only while the user's prompt hashes the same, and a changed history simply misses.
Deleted data must not linger even there, so ``forget(user)`` drops the user's entry (the deleting
replica after its commit, the others on the quarantine event) and ``forget_subjects`` drops the
entries of the users whose deletions completed (every replica learns those from the ledger, even
without Redis; the ledger knows them by HMAC only). Each bumps an epoch: an embedding computed from
a history read before a drop is never stored.
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Collection
from functools import lru_cache

import numpy as np

from apa.hashing import hmac_hex


@lru_cache(maxsize=65536)
def _subject(key: bytes, user_id: str) -> str:
    """The user's HMAC, as events and the ledger name them (kept: ingestion events arrive many a second)."""
    return hmac_hex(key, "user", user_id)


class HistoryCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[bytes, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0

    @staticmethod
    def _digest(prompt: str) -> bytes:
        return hashlib.sha256(prompt.encode()).digest()

    @property
    def epoch(self) -> int:
        """Read before the history is read; pass to ``put``."""
        return self._epoch

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._entries

    def get(self, user_id: str, prompt: str) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is None or entry[0] != self._digest(prompt):
                return None
            self._entries.move_to_end(user_id)
            return entry[1]

    def put(self, user_id: str, prompt: str, embedding: np.ndarray, epoch: int) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            if epoch != self._epoch:  # a deletion happened since this history was read
                return
            self._entries[user_id] = (self._digest(prompt), embedding)
            self._entries.move_to_end(user_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.pop(user_id, None)

    def discard(self, user_id: str) -> None:
        """The user's history changed (ingestion): drop the entry now. No epoch bump: an embedding of the
        old history stored meanwhile is keyed by the old prompt and can never match the new one."""
        with self._lock:
            self._entries.pop(user_id, None)

    def discard_subjects(self, subject_hmacs: Collection[str], key: bytes) -> None:
        """``discard`` for users known by their HMAC (another replica's ingestion)."""
        with self._lock:
            for user in [u for u in self._entries if _subject(key, u) in subject_hmacs]:
                del self._entries[user]

    def forget_subjects(self, subject_hmacs: Collection[str], key: bytes) -> None:
        """Drop the users whose ``hmac_hex(key, "user", id)`` is listed (completed deletions)."""
        with self._lock:
            self._epoch += 1
            for user in [u for u in self._entries if _subject(key, u) in subject_hmacs]:
                del self._entries[user]
