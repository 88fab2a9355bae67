"""Named crash points, for tests: where ``APA_FAULT_POINT`` names one, the process dies there at once,
as a SIGKILL would leave it (no cleanup, no ``finally``, no atexit).

``APA_FAULT_POINT=<name>`` dies at the first pass through ``<name>``, ``<name>@<n>`` at the n-th. The
variable is read at each call, so a test sets it in the environment of the process it starts.
``POINTS`` lists every point in the order a retrain, its purge and the preparation of ingested samples
pass them; the crash-point test and ``bench/chaos.py`` kill a worker at each.
"""

import os

EXIT_CODE = 137  # what a shell reports for a SIGKILLed process

POINTS = {
    "retrain.snapshot": "the shard's snapshot committed (shard retraining, its lock held), nothing trained",
    "training.step": "during training, after an optimiser step",
    "training.epoch-saved": "a resumable training's epoch state saved (`apa train`; the worker starts afresh)",
    "version.temp-written": "the new version's files written in its temp folder, before the rename",
    "version.renamed": "the version folder renamed into place, before the ledger records it",
    "retrain.recorded": "the version recorded serving and its deletions completed, before the swap is published",
    "retrain.published": "the swap published, before the purge of the completed deletions",
    "purge.samples-removed": "mid-purge: the samples gone from samples.parquet and run.json, the rest not yet",
    "purge.files-removed": "the purge's files done, before the ledger rows go",
    "ingest.memory-written": "ingested validation samples in the memory, before the versions' predictions",
}
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    assert name in POINTS, f"unknown crash point {name}"
    spec = os.environ.get("APA_FAULT_POINT")
    if not spec:
        return
    point, _, count = spec.partition("@")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] >= int(count or 1):
        os._exit(EXIT_CODE)
