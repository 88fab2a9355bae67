"""The run folder and immutable adapter versions (DESIGN.md, "Artifacts").

::

    <run>/run.json                      config, seed, base model sha256, split and shard of every
                                        sample, K-means centres
    <run>/samples.parquet               every sample with its split, shard and prompts
    <run>/adapters/shard-<k>/v<n>/      adapter_config.json, adapter_model.safetensors,
                                        manifest.json, valid_predictions.json
    <run>/single/v<n>/                  the one-adapter baseline (never served)
    <run>/sisa/shard-<k>/v<n>/          SISA's baseline: one adapter per shard of a random partition
                                        (never served; the run's own shards when it is random)
    <run>/cache/embeddings/             embedding cache
    <run>/cache/train/                  per-epoch training state of unfinished adapters (resume)
    <run>/cache/eval/                   test predictions of finished evaluation passes (resume)
    <run>/memory/valid.npz              validation memory (embeddings, labels, sample ids)

A version folder is built in a temporary folder beside its final place and renamed into place, so it
appears whole or not at all, and is never written again. Every file rewritten in a run folder is
written the same way (``replace_atomically``). Temporary files and folders are named ``.tmp-*``, so
what a killed writer leaves is found by name (``clean_temp``).
"""

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apa.engines.base import AdapterRef
from apa.errors import RunNotFound
from apa.faults import crash_point
from apa.hashing import sha256_json

if TYPE_CHECKING:  # types only: the ledger reads manifests with this module and imports no ML stack
    from apa.samples import Sample

_VERSION = re.compile(r"^v(\d+)$")
_GROUPED = re.compile(r"^([a-z]+)-(\d+)$")
TEMP_PREFIX = ".tmp-"
SINGLE = "single"
MANIFEST_HASHED_FIELDS = ("samples", "config", "seed", "base_model_sha256")


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def shard_dir(run_dir: Path, shard: int | str) -> Path:
    """``adapters/shard-<k>`` for a shard number, ``single`` for the baseline, ``<group>/shard-<k>`` for a
    baseline's shard ``<group>-<k>`` (SISA's ``sisa-<k>``, ``sisa.py``)."""
    if shard == SINGLE:
        return run_dir / SINGLE
    grouped = _GROUPED.match(shard) if isinstance(shard, str) else None
    if grouped:
        return run_dir / grouped.group(1) / f"shard-{grouped.group(2)}"
    return run_dir / "adapters" / f"shard-{shard}"


def versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    found = (_VERSION.match(p.name) for p in folder.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def latest_version(run_dir: Path, shard: int | str) -> int | None:
    found = versions(shard_dir(run_dir, shard))
    return found[-1] if found else None


def version_dir(run_dir: Path, shard: int | str, version: int) -> Path:
    return shard_dir(run_dir, shard) / f"v{version}"


def adapter_refs(run_dir: Path, adapters: Sequence[int | str]) -> list[AdapterRef]:
    """The newest version of each adapter id, numbered 0..K-1 in the given order (engine shards)."""
    refs = []
    for index, adapter in enumerate(adapters):
        version = latest_version(run_dir, adapter)
        if version is None:
            raise RunNotFound(f"{run_dir}: adapter {adapter} has no version yet (resume with `apa train --out`)")
        refs.append(AdapterRef(shard=index, version=version, path=version_dir(run_dir, adapter, version)))
    return refs


def manifest(
    *, shard: int | str, samples: "Sequence[Sample]", config: dict[str, Any], seed: int, base_model_sha256: str
) -> dict[str, Any]:
    """The training manifest of one adapter; ``manifest_sha256`` covers samples, config, seed and base."""
    content = [s.content() for s in sorted(samples, key=lambda s: s.sample_id)]
    doc = {"shard": shard, "samples": content, "config": config, "seed": seed,
           "base_model_sha256": base_model_sha256, "n_samples": len(content)}
    return {**doc, "manifest_sha256": manifest_sha256(doc)}


def selection_ids(doc: dict[str, Any]) -> set[str]:
    """The validation samples that chose a version's epoch (its manifest's replay record). The version's
    bytes depend on them, and its manifest names them: deleting one makes the version one to retrain and
    purge, like deleting a sample it trained on."""
    return set((doc.get("replay") or {}).get("selection") or [])


def verify_command(run_dir: Path, adapter: int | str, version: int) -> str:
    """The command that replays one version from its manifest (``apa verify``; certificates print it)."""
    which = f"--adapter {adapter}" if isinstance(adapter, str) else f"--shard {adapter}"
    return f"apa verify {run_dir} {which} --version {version}"


def manifest_sha256(doc: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest's hashed fields (DESIGN.md, "Artifacts")."""
    return sha256_json({key: doc[key] for key in MANIFEST_HASHED_FIELDS})


def write_version(
    run_dir: Path, shard: int | str, fill: Callable[[Path], None], manifest_doc: dict[str, Any]
) -> tuple[int, Path]:
    """Write the next version of ``shard``: ``fill(tmp)`` writes the files, then one atomic rename.

    Returns ``(version, path)``. Two writers racing for the same number both succeed: the loser
    takes the next number (a rename onto an existing, non-empty folder fails).
    """
    parent = shard_dir(run_dir, shard)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
    try:
        fill(tmp)
        version = (versions(parent) or [0])[-1] + 1
        while True:
            doc = {**manifest_doc, "version": version, "created_at": datetime.now(UTC).isoformat()}
            (tmp / "manifest.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
            crash_point("version.temp-written")
            try:
                os.rename(tmp, parent / f"v{version}")
                crash_point("version.renamed")
                return version, parent / f"v{version}"
            except OSError:
                if not (parent / f"v{version}").exists():
                    raise
                version += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_paths(folder: Path) -> list[Path]:
    """The ``.tmp-*`` files and folders under ``folder``, at any depth."""
    return sorted(folder.glob(f"**/{TEMP_PREFIX}*"))


def unchanged_for(paths: Sequence[Path], seconds: float) -> list[Path]:
    """The paths not written for ``seconds`` (a folder's time changes when an entry is added or renamed in).

    A live writer holds its temp file or folder only while it writes finished content in (seconds), so
    one older than that belongs to a writer that died; younger ones are left alone.
    """
    cutoff = time.time() - seconds
    found = []
    for path in paths:
        try:
            if path.lstat().st_mtime < cutoff:
                found.append(path)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
    return found


def remove(paths: Sequence[Path]) -> int:
    """Remove files and folders (gone already is fine); returns how many were there."""
    removed = 0
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed


def clean_temp(folder: Path, *, older_than_s: float = 600.0) -> int:
    """Remove the ``.tmp-*`` files and folders crashed writers left under ``folder``; returns how many."""
    return remove(unchanged_for(temp_paths(folder), older_than_s))


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter: run folders hold personal data (samples, prompts, caches)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def owner_only(path: Path) -> Path:
    path.chmod(0o600)
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """(Re)write ``path`` whole or not at all: ``write(tmp)`` fills a ``.tmp-*`` file beside it (owner-only,
    same suffix), then one rename. A writer killed half-way leaves the old file and a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _old_dir(path: Path) -> Path:
    return path.with_name(f".old-{path.name}")


def replace_dir(path: Path, fill: Callable[[Path], object]) -> None:
    """(Re)write the folder ``path`` whole or not at all: ``fill(tmp)`` fills a ``.tmp-*`` folder beside it,
    the old folder is renamed aside (``.old-<name>``), the new one into place, the old one removed. A writer
    killed between the two renames leaves no ``path``, only the old folder aside: ``recover_dir`` puts it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    try:
        fill(tmp)
        recover_dir(path)
        old = _old_dir(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: Path) -> Path:
    """``path`` as ``replace_dir`` left it, whenever it was stopped: the old folder back in place if the
    writer died between its renames, a leftover old folder removed if it died after them."""
    old = _old_dir(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    return path


def write_json_atomic(path: Path, value: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))

    replace_atomically(path, write)


def newest_run(runs_dir: Path) -> Path:
    runs = sorted(p for p in runs_dir.glob("*") if (p / "run.json").is_file()) if runs_dir.is_dir() else []
    if not runs:
        raise RunNotFound(f"no run under {runs_dir}: train one with `apa train`")
    return runs[-1]


def require_run(run_dir: Path) -> Path:
    if not (run_dir / "run.json").is_file():
        raise RunNotFound(f"{run_dir} is not a run folder (no run.json)")
    return run_dir
