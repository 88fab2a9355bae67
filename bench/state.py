"""A long benchmark run's durable state: its finished units, copied into a committed folder.

A paper-scale run takes longer than a machine lives. Its work folder (``<APA_HOME>/bench/quality/<name>``)
goes with the machine; the state folder (``docs/results/runs/<name>``) is committed. Every unit is copied
there as soon as it is finished, with the sha256 of each file recorded in ``state.json``:

* ``prepare``: ``run.json`` (split, partition, centres), ``samples.parquet``, ``memory/valid.npz``;
* ``embeddings/<n>.npz``: the embedding cache's entries, in chunks (one per embedding phase);
* each adapter version (``adapters/shard-<k>/v<n>``, ``single/v<n>``, ``sisa/shard-<k>/v<n>``): PEFT's
  files, the manifest and the validation predictions, fp32, no optimiser state;
* the unfinished adapter's last epoch (``cache/train/<adapter>-<hash>``: LoRA and best tensors, AdamW
  moments, the random generators), replaced each epoch and dropped once its version exists;
* each finished evaluation pass (``cache/eval/<key>.json``) and report (``eval-*``).

Everything keeps its place in the run folder's layout, so the state folder is itself a run folder that
``apa check`` reads. ``restore`` checks every recorded file against its sha256 (a mismatch is refused) and
copies the units the work folder lacks back in, each whole or not at all; the run then goes on from there
with the numbers it would have had (``apa.training`` resumes an epoch checkpoint exactly).
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from apa import artifacts, sisa
from apa.errors import APAError
from apa.hashing import sha256_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PREPARE = ("memory/valid.npz", "samples.parquet", "run.json")  # in restore order: run.json says it is whole
EMBEDDINGS = "cache/embeddings"
QUIET_S = 60.0  # embedding entries younger than this belong to a phase still running


class StateError(APAError):
    """A state folder that cannot be trusted (a file that does not match its recorded sha256)."""


def _copy_file(source: Path, target: Path) -> None:
    """``source`` to ``target`` whole or not at all (``artifacts.replace_atomically``)."""
    artifacts.replace_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def _copy_dir(source: Path, target: Path) -> None:
    """A folder whole or not at all (``artifacts.replace_dir``)."""
    artifacts.replace_dir(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def _checkpoint_adapter(name: str) -> int | str:
    """The adapter id of a checkpoint folder ``<adapter>-<hash>``."""
    adapter = name.rsplit("-", 1)[0]
    return int(adapter) if adapter.isdigit() else adapter


class RunState:
    """The state folder ``state_dir`` of the run folder ``run_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        self.state_dir, self.run_dir = state_dir, run_dir
        self._lock = threading.Lock()
        path = state_dir / STATE_FILE
        self.doc: dict[str, Any] = artifacts.read_json(path) if path.is_file() else {"units": {}}

    @property
    def units(self) -> dict[str, dict[str, Any]]:
        units: dict[str, dict[str, Any]] = self.doc["units"]
        return units

    def _save(self) -> None:
        artifacts.write_json_atomic(self.state_dir / STATE_FILE, self.doc)

    def _record(self, unit: str, files: dict[str, str], kind: str) -> None:
        self.units[unit] = {"kind": kind, "files": files, "saved_at": datetime.now(UTC).isoformat(timespec="seconds")}

    # -- work folder -> state -------------------------------------------------------------------
    def sync(self, *, final: bool = False) -> list[str]:
        """Copy every unit finished since the last sync (a changed checkpoint too); returns their names.
        ``final``: the run's process has stopped, so embeddings need not be quiet."""
        with self._lock:
            if not (self.run_dir / "run.json").is_file():
                return []
            saved = [name for name, fn in (("prepare", self._sync_prepare), ("embeddings", self._sync_embeddings))
                     if fn(final)]
            saved += self._sync_folders() + self._sync_files()
            if saved:
                self._save()
            return saved

    def _sync_prepare(self, final: bool) -> bool:
        if "prepare" in self.units:
            return False
        files = {}
        for rel in PREPARE:
            _copy_file(self.run_dir / rel, self.state_dir / rel)
            files[rel] = sha256_file(self.state_dir / rel)
        self._record("prepare", files, "prepare")
        return True

    def _sync_embeddings(self, final: bool) -> bool:
        root = self.run_dir / EMBEDDINGS
        known = {entry for u in self.units.values() if u["kind"] == "embeddings" for entry in u["entries"]}
        found = sorted(root.glob("*/*/*.npy"))
        new = [p for p in found if p.relative_to(root).as_posix() not in known]
        if not new or (not final and time.time() - max(p.stat().st_mtime for p in found) < QUIET_S):
            return False
        index = sum(1 for u in self.units.values() if u["kind"] == "embeddings")
        rel = f"embeddings/{index:03d}.npz"
        paths = [p.relative_to(root).as_posix() for p in new]
        target = self.state_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            np.savez_compressed(handle, paths=np.array(paths), vectors=np.stack([np.load(p) for p in new]))
        self._record(rel, {rel: sha256_file(target)}, "embeddings")
        self.units[rel]["entries"] = paths
        return True

    def _finished_folders(self) -> Iterator[tuple[Path, str]]:
        for parent in ("adapters", artifacts.SINGLE, sisa.NAME):
            for manifest in sorted((self.run_dir / parent).glob("**/v*/manifest.json")):
                yield manifest.parent, "adapter"
        for folder in sorted((self.run_dir / "cache" / "train").glob("*")):
            if folder.is_dir() and not folder.name.startswith(".") and (folder / "state.json").is_file():
                yield folder, "checkpoint"

    def _sync_folders(self) -> list[str]:
        saved = []
        for folder, kind in self._finished_folders():
            unit = folder.relative_to(self.run_dir).as_posix()
            if kind == "adapter" and unit in self.units:
                continue  # a version is written once
            if kind == "checkpoint" and artifacts.latest_version(self.run_dir, _checkpoint_adapter(folder.name)):
                continue  # finished meanwhile: its version is the unit now
            files = {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()}
            if self.units.get(unit, {}).get("files") == files:
                continue
            inode = folder.stat().st_ino
            _copy_dir(folder, self.state_dir / unit)
            if not folder.exists() or folder.stat().st_ino != inode:  # replaced while copied: next time
                continue
            self._record(unit, files, kind)
            saved.append(unit)
        for unit, doc in list(self.units.items()):  # a checkpoint whose adapter has finished goes
            if doc["kind"] == "checkpoint" and artifacts.latest_version(
                    self.state_dir, _checkpoint_adapter(Path(unit).name)) is not None:
                shutil.rmtree(self.state_dir / unit, ignore_errors=True)
                del self.units[unit]
                saved.append(f"-{unit}")
        return saved

    def _sync_files(self) -> list[str]:
        saved = []
        found = [*sorted((self.run_dir / "cache" / "eval").glob("*.json")), *sorted(self.run_dir.glob("eval-*"))]
        for path in found:
            unit = path.relative_to(self.run_dir).as_posix()
            if path.name.startswith(".") or path.suffix == ".tmp":
                continue
            digest = sha256_file(path)
            if self.units.get(unit, {}).get("files") == {unit: digest}:
                continue
            _copy_file(path, self.state_dir / unit)
            self._record(unit, {unit: digest}, "eval")
            saved.append(unit)
        return saved

    @contextlib.contextmanager
    def syncing(self, every_s: float = 30.0) -> Iterator[None]:
        """Sync every ``every_s`` seconds in a background thread while the block runs, and once when it
        ends (however it ends)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    for unit in self.sync():
                        print(f"state: saved {unit}", flush=True)
                except OSError as exc:  # a file replaced under the copy: the next pass takes it
                    log.warning("state sync: %s", exc)

        thread = threading.Thread(target=loop, name="state-sync", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            for unit in self.sync(final=True):
                print(f"state: saved {unit}", flush=True)

    # -- state -> work folder -------------------------------------------------------------------
    def verify(self) -> int:
        """Check every recorded file against its sha256 (a folder unit a kill left aside between its renames is
        put back first: ``artifacts.recover_dir``); returns how many were checked."""
        checked = 0
        for unit, doc in self.units.items():
            folder_unit = doc["kind"] not in ("prepare", "embeddings", "eval")
            base = artifacts.recover_dir(self.state_dir / unit) if folder_unit else self.state_dir
            for rel, digest in doc["files"].items():
                path = base / rel
                if not path.is_file():
                    raise StateError(f"{self.state_dir}: {unit} lacks {rel}")
                if sha256_file(path) != digest:
                    raise StateError(f"{self.state_dir}: {rel} of {unit} does not match the sha256 recorded "
                                     "when it was saved; refusing to restore from it")
                checked += 1
        return checked

    def restore(self) -> list[str]:
        """Verify the whole state, then copy into the work folder every unit it lacks (the preparation
        first, ``run.json`` last of it); returns the units copied."""
        self.verify()
        restored = []
        order = sorted(self.units.items(), key=lambda kv: kv[1]["kind"] != "prepare")
        for unit, doc in order:
            kind = doc["kind"]
            if kind == "prepare":
                if (self.run_dir / "run.json").is_file():
                    continue
                for rel in PREPARE:
                    _copy_file(self.state_dir / rel, self.run_dir / rel)
            elif kind == "embeddings":
                with np.load(self.state_dir / unit) as chunk:
                    for rel, vector in zip(chunk["paths"], chunk["vectors"], strict=True):
                        target = self.run_dir / EMBEDDINGS / str(rel)
                        if not target.is_file():
                            target.parent.mkdir(parents=True, exist_ok=True)
                            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
                            with os.fdopen(fd, "wb") as handle:
                                np.save(handle, vector)
                            os.replace(tmp, target)
            elif kind in ("adapter", "checkpoint"):
                target = self.run_dir / unit
                if target.exists() or (kind == "checkpoint" and artifacts.latest_version(
                        self.run_dir, _checkpoint_adapter(target.name)) is not None):
                    continue
                _copy_dir(self.state_dir / unit, target)
            else:
                if (self.run_dir / unit).is_file():
                    continue
                _copy_file(self.state_dir / unit, self.run_dir / unit)
            restored.append(unit)
        return restored

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.state_dir.rglob("*") if f.is_file())


def describe(state: RunState) -> str:
    kinds: dict[str, int] = {}
    for doc in state.units.values():
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    return json.dumps({"units": kinds, "megabytes": round(state.size_bytes() / 1e6, 1)})
