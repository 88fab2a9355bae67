"""Content hashes used in manifests, caches and asset checks."""

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form every manifest hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hmac_hex(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``<kind>:<value>``: how deleted data is identified afterwards."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
