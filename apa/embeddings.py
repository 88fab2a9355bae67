"""Sample embeddings from the frozen base model, cached on disk by (model hash, prompt hash).

Pooling: the final-layer hidden state of the prompt's last token (``### Response:\\n``). In a causal
LM that is the only position that has read the whole prompt, and it is exactly the state the answer
is read from, so two samples close in this space are ones the model is asked about alike. Mean
pooling would be dominated by the long template that every prompt shares.

Cache entries are one ``.npy`` file each (written atomically), so entries of deleted samples can be
purged one by one.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from apa import artifacts, prompts
from apa.hashing import sha256_text
from apa.model import (
    BaseModel,
    PackedRow,
    forward_last_hidden,
    run_head,
    shared_prefix_length,
    token_ids,
)


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
        artifacts.replace_atomically(self.path(prompt), lambda tmp: np.save(tmp, vector.astype(np.float32)))

    def discard(self, prompt: str) -> bool:
        path = self.path(prompt)
        if path.is_file():
            path.unlink()
            return True
        return False


def template_head(base: BaseModel, noun: str) -> PackedRow:
    """The token prefix every prompt of the template starts with (template text only, never a user's
    data) and the base model's keys and values for it, computed once per base model and noun."""
    head = base.heads.get(noun)
    if head is None:
        probes = token_ids(base.tokenizer, [prompts.history_prompt(["A"], [], noun=noun),
                                            prompts.history_prompt([], ["B"], noun=noun)])
        with torch.inference_mode():
            head = base.heads[noun] = run_head(base.model, probes[0][:shared_prefix_length(probes)], base.device)
    return head


def embed(
    base: BaseModel, texts: Sequence[str], *, cache: EmbeddingCache | None = None, batch_size: int = 8,
    desc: str | None = None, noun: str = "movie",
) -> np.ndarray:
    """Embeddings of ``texts`` in order: [n, hidden] float32. Cached entries are not recomputed, and new
    ones are cached as each batch finishes; the template's head (``template_head``) runs once per
    process, not once per prompt."""
    out = np.empty((len(texts), base.model.config.hidden_size), dtype=np.float32)
    todo: list[int] = []
    for i, text in enumerate(texts):
        hit = cache.get(text) if cache is not None else None
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    if todo:
        def keep(rows: list[int], hidden: torch.Tensor) -> None:  # cached batch by batch: a long run
            for row, vector in zip(rows, hidden, strict=True):  # that stops keeps what it embedded
                out[todo[row]] = vector.numpy()
                if cache is not None:
                    cache.put(texts[todo[row]], out[todo[row]])

        forward_last_hidden(base, [texts[i] for i in todo], batch_size=batch_size, desc=desc,
                            head=template_head(base, noun), done=keep)
    return out


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Unit-length rows (cosine similarity becomes a dot product, :func:`cosine`)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def cosine(unit_a: np.ndarray, unit_b: np.ndarray) -> np.ndarray:
    """Dot products of unit rows ([n, d] and [m, d]) in float64: [n, m].

    Every neighbour order, nearest centre and partition is read off these, so they must not depend on the
    machine. A float32 product rounds at ~6e-8, where near-duplicate prompts' similarities differ (the
    paper run's test queries have 20th and 21st neighbours one float32 step apart), and which way it rounds
    depends on the BLAS kernel the CPU picks (OpenBLAS's SkylakeX and Zen kernels disagree): measured, 1 of
    1,000 test queries changed its weights between two machines. In float64 every product of float32 inputs
    is exact and the sums agree to ~1e-16, far below any gap two different prompts leave."""
    return np.asarray(unit_a, dtype=np.float64) @ np.asarray(unit_b, dtype=np.float64).T
