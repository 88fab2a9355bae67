"""Sample embeddings from the frozen base model, cached on disk by (model hash, prompt hash).

Pooling: the final-layer hidden state of the prompt's last token (``### Response:\\n``). In a causal
LM that is the only position that has read the whole prompt, and it is exactly the state the answer
is read from, so two samples close in this space are ones the model is asked about alike. Mean
pooling would be dominated by the long template that every prompt shares.

Cache entries are one ``.npy`` file each (written atomically), so entries of deleted samples can be
purged one by one.
"""

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from apa.hashing import sha256_text
from apa.model import BaseModel, forward_last_hidden


class EmbeddingCache:
    def __init__(self, root: Path, model_sha256: str) -> None:
        self.root = root / model_sha256[:16]

    def path(self, prompt: str) -> Path:
        digest = sha256_text(prompt)
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, prompt: str) -> np.ndarray | None:
        path = self.path(prompt)
        return np.load(path) if path.is_file() else None

    def put(self, prompt: str, vector: np.ndarray) -> None:
        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, vector.astype(np.float32))
        os.replace(tmp, path)

    def discard(self, prompt: str) -> bool:
        path = self.path(prompt)
        if path.is_file():
            path.unlink()
            return True
        return False


def embed(
    base: BaseModel, texts: Sequence[str], *, cache: EmbeddingCache | None = None, batch_size: int = 8,
    desc: str | None = None,
) -> np.ndarray:
    """Embeddings of ``texts`` in order: [n, hidden] float32. Cached entries are not recomputed."""
    out = np.empty((len(texts), base.model.config.hidden_size), dtype=np.float32)
    todo: list[int] = []
    for i, text in enumerate(texts):
        hit = cache.get(text) if cache is not None else None
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    if todo:
        hidden: torch.Tensor = forward_last_hidden(
            base, [texts[i] for i in todo], batch_size=batch_size, desc=desc
        )
        for row, i in enumerate(todo):
            out[i] = hidden[row].numpy()
            if cache is not None:
                cache.put(texts[i], out[i])
    return out


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Unit-length rows (cosine similarity becomes a dot product)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)
